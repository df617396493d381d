"""tools.benchmark: runs with grain, tfds, sentencepiece, tensorboardX, pycocoevalcap and PIL
unimportable (a bare accelerator host); sweeps parse into typed config overrides; the masking
it times alone selects what the model's own forward selects."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from sycoca_jax import flops, sharding
from sycoca_jax.config_args import load_config
from sycoca_jax.interop import open_clip_presets
from sycoca_jax.models import sycoca, vit
from sycoca_jax.tools import benchmark
from tests.helpers import ROOT, config_for

# What a bare accelerator image lacks (tensorflow and array_record come with tfds and grain).
ABSENT = (
    "grain",
    "tensorflow_datasets",
    "tensorflow",
    "array_record",
    "sentencepiece",
    "tensorboardX",
    "pycocoevalcap",
    "PIL",
)

_BLOCKER = """
import sys

ABSENT = {absent!r}


class _Absent:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ABSENT:
            raise ModuleNotFoundError(f"No module named {{name!r}} (absent on this host)")
        return None


sys.meta_path.insert(0, _Absent())
"""


@pytest.mark.slow
def test_runs_without_the_data_and_evaluation_stack(tmp_path):
    """The benchmark, the model, losses, optimiser, sharding and the train step in a process
    where the input-pipeline and evaluation libraries cannot be imported."""
    (tmp_path / "sitecustomize.py").write_text(_BLOCKER.format(absent=ABSENT))
    env = {
        **os.environ,
        "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}",
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "",
    }
    command = [
        sys.executable,
        "-m",
        "sycoca_jax.tools.benchmark",
        f"--config={ROOT / 'configs' / 'sycoca.py'}:tiny",
        "--sweep=batch_size=4",
        "--steps=1",
        "--warmup=1",
        "--config.model.image_depth=1",
        "--config.model.text_depth=1",
        "--config.model.multimodal_depth=1",
        "--config.model.decoder_depth=1",
        f"--trace_dir={tmp_path / 'trace'}",
    ]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1500)
    assert result.returncode == 0, result.stderr[-3000:]
    (line,) = [json.loads(x) for x in result.stdout.splitlines() if x.startswith("{")]
    assert line["point"] == {"batch_size": "4"} and line["batch_size"] == 4
    assert line["step_ms"] > 0 and line["samples_per_s"] > 0 and np.isfinite(line["loss"])
    assert line["mfu"] is None  # no peak FLOP/s for CPUs
    assert line["trace"]["kernel_ms"] > 0 and line["trace"]["busy_ms"] > 0
    assert 0 < line["masking_share"] < 1 and line["compile_s"] > 0
    # The blocker really was active in that process.
    probe = subprocess.run(
        [sys.executable, "-c", "import grain"], capture_output=True, text=True, env=env
    )
    assert probe.returncode != 0 and "absent on this host" in probe.stderr


def test_sweep_points_are_every_combination():
    points = benchmark.parse_sweep("batch_size=128,256; model.remat=none,dots")
    assert points == [
        {"batch_size": "128", "model.remat": "none"},
        {"batch_size": "128", "model.remat": "dots"},
        {"batch_size": "256", "model.remat": "none"},
        {"batch_size": "256", "model.remat": "dots"},
    ]
    assert benchmark.parse_sweep("") == [{}]  # one point: the config as given
    with pytest.raises(ValueError, match="key=value1,value2"):
        benchmark.parse_sweep("batch_size")


def test_points_override_typed_fields_and_unknown_keys_fail():
    config = config_for("tiny")
    point = {"batch_size": "64", "model.scan": "true", "model.attention_impl": "auto"}
    changed = benchmark.apply_point(config, point)
    assert changed.batch_size == 64 and changed.model.scan is True
    assert changed.model.attention_impl == "auto"
    assert config.batch_size == 32 and config.model.scan is False  # the original is untouched
    with pytest.raises(ValueError, match="no such field"):
        benchmark.apply_point(config, {"model.remats": "dots"})
    with pytest.raises(ValueError, match="true or false"):
        benchmark.apply_point(config, {"model.scan": "maybe"})


@pytest.mark.parametrize("preset", ["openclip_b32", "b16"])
def test_presets_set_up_whatever_their_duration_unit(preset):
    """The benchmark presets (epoch-based durations, no dataset at hand) build their setup; the
    open_clip preset has open_clip's parameter shapes."""
    config = load_config(f"{ROOT / 'configs' / 'benchmark.py'}:{preset}")
    assert config.total_epochs and config.total_steps is None
    setup = benchmark.make_setup(config, sharding.make_mesh((-1, 1, 1)))
    assert setup.total_steps > 0
    params = setup.abstract_state["params"]
    if preset == "openclip_b32":
        assert params["text_encoder"]["token_embedding"]["embedding"].shape == (49408, 512)
        assert params["caption_pooler"]["queries"].shape == (256, 512)
        assert "contrastive_pooler" not in params  # open_clip's single pooler


def test_the_open_clip_preset_is_open_clips_model_and_costs_what_it_costs():
    """The speed reference was open_clip's coca_ViT-B-32 itself: the preset must do its work,
    class token and two-block multimodal layers included (it once did 12 % less)."""
    config = load_config(f"{ROOT / 'configs' / 'benchmark.py'}:openclip_b32")
    exact = open_clip_presets.model_config("coca_ViT-B-32", "coca")
    for key, value in exact.items():
        assert config.model[key] == value, key
    assert config.model.class_token and config.model.layer_layout == "open_clip"
    assert flops.train_flops_per_example(config.model) / 1e9 == pytest.approx(101.14, abs=0.01)


def test_timed_masking_selects_what_the_model_selects(tiny_model, tiny_params, tiny_inputs):
    """The masking jitted alone (relevance, top-k, gathers) is the model's own: the same
    kept patches for captioning and the same hidden patches for TG-MIM."""
    images, tokens = tiny_inputs
    out = tiny_model.apply(
        {"params": tiny_params}, images, tokens, rngs={"masking": jax.random.key(0)}
    )

    def states(model, images, tokens):
        text = sycoca.caption_input_and_target(tokens)[0]
        return model.image_encoder(images), model.text_encoder(text)[0]

    patch_states, token_states = tiny_model.apply(
        {"params": tiny_params}, images, tokens, method=states
    )
    kept, visible, hidden_mask = tiny_model.apply(
        {"params": tiny_params},
        images,
        patch_states,
        token_states,
        tokens,
        method=benchmark._masking_only,
    )
    pixels = vit.patchify(images, tiny_model.patch_size)
    np.testing.assert_array_equal(kept, vit.gather_tokens(pixels, out["caption_indices"]))
    np.testing.assert_array_equal(hidden_mask, out["tgmim_mask"])
    visible_idx = np.nonzero(~np.asarray(out["tgmim_mask"][0]))[0]
    assert sorted(map(tuple, np.asarray(visible[0]))) == sorted(
        map(tuple, np.asarray(pixels[0][visible_idx]))
    )
