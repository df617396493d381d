"""Import and export of open_clip CoCa weights: exact round trips through the Orbax checkpoint,
open_clip's exact shapes for every preset, and clear refusals of what does not fit."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from sycoca_jax.config_args import load_config
from sycoca_jax.errors import UserError
from sycoca_jax.interop import open_clip_config, open_clip_presets, open_clip_weights
from sycoca_jax.models import build, sycoca
from sycoca_jax.tools import export_open_clip, import_open_clip
from tests.helpers import ROOT, one_error_line, run_module
from tests.interop import golden


def _config_file(tmp_path, name: str) -> str:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(golden.MANIFEST[name]["config"]))
    return str(path)


@pytest.mark.parametrize("name,scan", [("single", True), ("no_pooler", False)])
def test_import_then_export_gives_back_the_state_dict(tmp_path, name, scan):
    """Through the tools and the Orbax checkpoint, with a new TG-MIM head in between."""
    weights = golden.weights_path(name)
    done = import_open_clip.import_open_clip(
        _config_file(tmp_path, name), weights, str(tmp_path / "w"), objective="sycoca", scan=scan
    )
    assert done["new_heads"] == ["tgmim_decoder"]
    out = str(tmp_path / "out.safetensors")
    exported = export_open_clip.export_open_clip(str(tmp_path / "w"), out)
    assert exported["dropped"] == ["tgmim_decoder"]
    original, back = load_file(weights), load_file(out)
    assert sorted(back) == sorted(original)
    for key, value in original.items():
        assert back[key].dtype == value.dtype and back[key].shape == value.shape, key
        np.testing.assert_array_equal(back[key], value, err_msg=key)
    written = json.loads((tmp_path / "out.json").read_text())
    assert open_clip_config.model_fields(written) == open_clip_config.model_fields(
        golden.MANIFEST[name]["config"]
    )


@pytest.mark.parametrize("name", ["coca_ViT-B-32", "coca_ViT-L-14", "coca_base"])
def test_presets_have_open_clips_exact_shapes(name):
    """Every key and shape of open_clip's state dict (recorded by make_fixtures.py), for the
    model configs/open_clip.py builds (scanned layers), computed without allocating weights."""
    with gzip.open(golden.DIRECTORY / "preset_shapes.json.gz", "rt") as f:
        want = {k: tuple(v) for k, v in json.load(f)[name].items()}
    fields = open_clip_presets.model_config(name, "sycoca")
    assert fields["scan"]
    assert open_clip_weights.state_dict_shapes(sycoca.SyCoCa(**fields)) == want


def test_missing_unexpected_and_misshapen_keys_are_listed():
    model = golden.model("single")
    state = open_clip_weights.read_safetensors(golden.weights_path("single"))
    broken = dict(state)
    del broken["text.cls_emb"]
    broken["text.extra"] = np.zeros(3, np.float32)
    with pytest.raises(
        ValueError, match=r"missing keys: text\.cls_emb.*unexpected keys: text\.extra"
    ):
        open_clip_weights.to_params(broken, model)
    misshapen = dict(state, **{"visual.proj": np.zeros((3, 3), np.float32)})
    with pytest.raises(ValueError, match="image_projection/kernel"):
        open_clip_weights.to_params(misshapen, model)
    with pytest.raises(ValueError, match="no init was given"):
        open_clip_weights.to_params(state, golden.model("single", use_tgmim=True))


def test_pickled_files_are_refused_unread(tmp_path):
    """A torch.save file (zip) or bare pickle is refused with the conversion recipe; nothing in it
    is loaded (the file here would run code if unpickled)."""
    zipped = tmp_path / "model.safetensors"
    zipped.write_bytes(b"PK\x03\x04" + b"\x00" * 64)
    bare = tmp_path / "open_clip_pytorch_model.bin"
    bare.write_bytes(b"\x80\x04cos\nsystem\n(S'echo owned'\ntR.")
    for path in (zipped, bare):
        with pytest.raises(ValueError, match="never unpickled.*safetensors.torch") as e:
            open_clip_weights.read_safetensors(str(path))
        assert "\n" not in str(e.value)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a tensor file at all")
    with pytest.raises(ValueError, match="not a .safetensors file"):
        open_clip_weights.read_safetensors(str(junk))


def test_half_precision_weights_are_read_as_float32(tmp_path):
    state = load_file(golden.weights_path("no_pooler"))
    path = str(tmp_path / "half.safetensors")
    save_file({k: v.astype(np.float16) for k, v in state.items()}, path)
    read = open_clip_weights.read_safetensors(path)
    assert read["visual.proj"].dtype == np.float32
    np.testing.assert_array_equal(read["visual.proj"], state["visual.proj"].astype(np.float16))


def test_import_refuses_a_used_workdir(tmp_path):
    config, weights = _config_file(tmp_path, "no_pooler"), golden.weights_path("no_pooler")
    import_open_clip.import_open_clip(config, weights, str(tmp_path / "w"))
    with pytest.raises(FileExistsError, match="already holds checkpoints") as refused:
        import_open_clip.import_open_clip(config, weights, str(tmp_path / "w"))
    assert isinstance(refused.value, UserError)  # the command line prints it as one line


def test_missing_inputs_are_user_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no weights file") as missing:
        open_clip_weights.read_safetensors(str(tmp_path / "none.safetensors"))
    assert isinstance(missing.value, UserError)
    with pytest.raises(FileNotFoundError, match="no open_clip model config") as missing:
        open_clip_presets.model_config(str(tmp_path / "none.json"))
    assert isinstance(missing.value, UserError)


@pytest.mark.parametrize(
    "module,args,message",
    [
        ("import_open_clip", ["--model=coca_tiny", "--weights=none.safetensors"], "no weights"),
        ("export_open_clip", ["--out=model.bin"], "--out must name a .safetensors file"),
        ("export_open_clip", ["--out=model.safetensors"], "no checkpoint under"),
    ],
)
def test_the_tools_print_input_errors_as_one_line(tmp_path, module, args, message):
    """Through ``binaries.run_app``: one ``error:`` line, exit code 1, nothing written."""
    program = f"sycoca_jax.tools.{module}"
    result = run_module(program, *args, f"--workdir={tmp_path / 'w'}", cwd=tmp_path)
    assert result.returncode == 1
    assert message in one_error_line(result, program)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_layouts_open_clip_cannot_hold_are_refused():
    fused = golden.fields("single", layer_layout="fused")
    with pytest.raises(ValueError, match="layer_layout='fused'"):
        open_clip_config.check_open_clip_layout(fused)
    cascade = golden.fields("single", pooler="cascade")
    with pytest.raises(ValueError, match="pooler='cascade'"):
        open_clip_weights.rules(sycoca.SyCoCa(**cascade))


@pytest.mark.parametrize(
    "where,key,value,message",
    [
        ("vision_cfg", "ls_init_value", 1e-5, "only None"),
        ("vision_cfg", "attentional_pool", "parallel", "only True/False"),
        ("text_cfg", "embed_cls", False, "appends a CLS token"),
        ("text_cfg", "hf_model_name", "roberta-base", "only None"),
        ("multimodal_cfg", "heads", 4, "shares the text tower's heads"),
        (None, "quick_gelu", True, "only False"),
        (None, "mystery", 1, "unknown key"),
    ],
)
def test_unsupported_open_clip_configs_are_named(where, key, value, message):
    config = open_clip_presets.preset("coca_ViT-B-32")
    (config if where is None else config[where])[key] = value
    with pytest.raises(ValueError, match=f"{key}={value!r}.*{message}"):
        open_clip_config.model_fields(config)


@pytest.mark.parametrize("arg", ["coca_ViT-B-32", "model=coca_base,objective=coca,data=cc3m"])
def test_the_config_file_builds_the_preset(arg):
    """configs/open_clip.py: the preset's model over configs/sycoca.py's training recipe, the
    CLIP tokenizer, and initialisation of exactly the parts open_clip provides."""
    config = load_config(f"{ROOT / 'configs' / 'open_clip.py'}:{arg}")
    name, objective = config.size, config.objective
    fields = open_clip_presets.model_config(name, objective)
    assert {k: config.model[k] for k in fields} == fields
    model = build.from_config(config.model)
    assert {k: getattr(model, k) for k in fields} == fields
    assert config.data.tokenizer == "clip_bpe"
    rules = open_clip_weights.rules(sycoca.SyCoCa(**fields))
    assert set(config.init.subtrees) == {path[0] for rule in rules for path in rule.ours}
    with pytest.raises(ValueError, match="unknown open_clip model 'coca_ViT-H-14'"):
        load_config(f"{ROOT / 'configs' / 'open_clip.py'}:coca_ViT-H-14")
