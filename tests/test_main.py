"""End-to-end training on the small embedded dataset: learning, metrics, checkpoints and the
errors a user meets first (exact resume after SIGTERM and kill -9: tests/test_reliability.py)."""

from __future__ import annotations

import io
import os
import pathlib
import struct
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest

from sycoca_jax import checkpoint as ckpt
from sycoca_jax import config_diff, sharding, train
from sycoca_jax.metrics import read_metrics
from sycoca_jax.tools import inspect_checkpoint, trace_summary
from sycoca_jax.train import pretrain, profiling
from tests.helpers import ROOT, tiny_config

LOSSES = ("loss/itc", "loss/caption", "loss/tgmim")


@pytest.fixture(scope="module")
def tiny_run(tiny_pretrained):
    return tiny_pretrained


def test_tiny_run_learns_and_logs_every_key(tiny_run):
    _, workdir, last = tiny_run
    records = [r for r in read_metrics(workdir) if "loss" in r]
    first, final = records[0], records[-1]
    assert [r["step"] for r in records] == [1, 10, 20, 30, 40, 50, 60]
    for key in LOSSES:
        assert final[key] < 0.8 * first[key], (key, first[key], final[key])
    required = {
        "step",
        "loss",
        *LOSSES,
        "lr",
        "grad_norm",
        "param_norm",
        "update_norm",
        "temperature",
        "examples_per_sec",
        "examples_per_sec_per_device",
        "tflops_per_sec_per_device",
        "mfu",
        "skipped_records",
    }
    assert required <= set(final)
    assert final["mfu"] is None  # no peak FLOP/s for CPUs
    assert final["skipped_records"] == 0 and final["tflops_per_sec_per_device"] > 0
    assert last["step"] if "step" in last else True
    validation = [r for r in read_metrics(workdir) if "val/loss" in r]
    assert [r["step"] for r in validation] == [30, 60]
    assert any("compile/compile_seconds" in r for r in read_metrics(workdir))
    assert os.listdir(os.path.join(workdir, "tensorboard"))


def test_param_norm_is_that_of_the_parameters_the_logged_step_returned(tiny_run):
    """``param_norm`` is computed at log steps from the state the step returned (no longer
    inside every step): at step 60 it is the norm of the step-60 checkpoint's parameters."""
    _, workdir, _ = tiny_run
    records = {r["step"]: r for r in read_metrics(workdir) if "param_norm" in r}
    assert sorted(records) == [1, 10, 20, 30, 40, 50, 60]
    params = ckpt.load_params(workdir, step=60)
    squares = sum(np.sum(np.square(np.asarray(x, np.float64))) for x in jax.tree.leaves(params))
    np.testing.assert_allclose(records[60]["param_norm"], np.sqrt(squares), rtol=1e-5)
    assert records[1]["param_norm"] != records[60]["param_norm"]


def test_profile_steps_write_a_trace(tiny_run):
    _, workdir, _ = tiny_run
    traces = list(pathlib.Path(workdir, "profile").rglob("*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0
    summary = trace_summary.summarize(trace_summary.find_trace(traces[0].parent), steps=2)
    assert summary["kernel_ms"] > 0


@pytest.mark.parametrize("text", ["0,2", "5,3", "a,b", "1,2,3"])
def test_bad_profile_steps_are_one_line_errors(text):
    with pytest.raises(ValueError, match="config.profile_steps"):
        profiling.parse_steps(text)


def _tensorboard_images(workdir: str) -> dict[str, list]:
    """Image summaries in the run's TensorBoard event files (TFRecord framing: length, its
    CRC, the Event proto, its CRC), by tag."""
    from tensorboardX.proto import event_pb2

    found: dict[str, list] = {}
    for path in pathlib.Path(workdir, "tensorboard").glob("events.*"):
        data, offset = path.read_bytes(), 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            event = event_pb2.Event.FromString(data[offset + 12 : offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                if value.HasField("image"):
                    found.setdefault(value.tag, []).append((event.step, value.image))
    return found


def test_masking_pictures_go_to_tensorboard_when_evals_run(tiny_run):
    config, workdir, _ = tiny_run
    images = _tensorboard_images(workdir)
    assert [step for step, _ in images["pictures/masking"]] == [config.total_steps]
    _, image = images["pictures/masking"][0]
    size = config.model.image_size
    # One row per picture, five panels side by side (image, relevance, kept, hidden, TG-MIM).
    assert (image.width, image.height) == (5 * size, config.tensorboard_pictures * size)
    decoded = np.asarray(PIL.Image.open(io.BytesIO(image.encoded_image_string)))
    assert decoded.shape == (config.tensorboard_pictures * size, 5 * size, 3)
    assert decoded.std() > 0


def test_checkpoints_and_inspection(tiny_run):
    _, workdir, _ = tiny_run
    checkpointer = ckpt.Checkpointer(workdir, async_save=False)
    assert list(checkpointer.all_steps()) == [30, 60]
    checkpointer.close()
    info = inspect_checkpoint.inspect(workdir)
    earlier = inspect_checkpoint.inspect(workdir, step=30)
    assert info["step"] == 60 and info["params"]["total"] == 548_737
    assert info["digest"] != earlier["digest"]
    assert inspect_checkpoint.inspect(workdir)["digest"] == info["digest"]
    image_tower = ckpt.load_params(workdir, "image_encoder")
    assert set(image_tower) == {"encoder", "ln_final", "patch_embedding", "posemb"}
    with pytest.raises(KeyError, match="no 'image_encodr'"):
        ckpt.load_params(workdir, "image_encodr")


def test_finished_run_resumes_without_new_steps(tiny_run):
    config, workdir, _ = tiny_run
    before = len(read_metrics(workdir))
    train.train_and_evaluate(config, workdir)
    assert len([r for r in read_metrics(workdir)[before:] if "loss" in r]) == 0


def test_incompatible_checkpoint_names_the_parameters(tiny_run):
    config, workdir, _ = tiny_run
    other = config.copy_and_resolve_references()
    other.model.vocab_size = 1024
    other.total_steps = 61
    # The changed model is refused first, by the config comparison on resume ...
    with pytest.raises(config_diff.ConfigChangedError, match=r"model.vocab_size.*512.*1024"):
        train.train_and_evaluate(other, workdir)
    # ... and, once accepted, by the checkpoint's shapes, naming each parameter.
    other.allow_config_change = "model.vocab_size"
    expected = (
        r"text_encoder/token_embedding/embedding: checkpoint \(512, 64\) vs model \(1024, 64\)"
    )
    with pytest.raises(ckpt.IncompatibleCheckpointError, match=expected):
        train.train_and_evaluate(other, workdir)


def test_transfer_init_copies_the_image_tower(tiny_run, data_dir, tmp_path):
    _, source_workdir, _ = tiny_run
    config = tiny_config(data_dir, arg="tiny,objective=clip")
    config.init.checkpoint = source_workdir
    config.init.subtrees = ("image_encoder",)
    config.total_steps = 1
    setup = train.make_setup(config, sharding.Placement.from_config(config.mesh), None)
    checkpointer = ckpt.Checkpointer(str(tmp_path))
    state, origin = train.restore_or_init(setup, checkpointer, None)
    checkpointer.close()
    assert "image_encoder" in origin
    loaded = ckpt.load_params(source_workdir, "image_encoder")
    for a, b in zip(
        jax.tree.leaves(loaded), jax.tree.leaves(state["params"]["image_encoder"]), strict=True
    ):
        np.testing.assert_array_equal(a, np.asarray(b))


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(data_dir, tmp_path, monkeypatch):
    """The step's IC loss turns NaN from step 5 on: the loop names step 5 and the term, and the
    checkpoint of step 4 is the last one."""
    real_compile = pretrain.compile_train_step

    def compile_with_a_nan_from_step_5(setup):
        compiled, report = real_compile(setup)

        def step(state, batch):
            state, metrics = compiled(state, batch)
            if int(state["step"]) >= 5:
                metrics = {**metrics, "loss": jnp.nan, "loss/caption": jnp.nan}
            return state, metrics

        return step, report

    monkeypatch.setattr(pretrain, "compile_train_step", compile_with_a_nan_from_step_5)
    config = tiny_config(data_dir)
    config.model.image_depth = config.model.text_depth = config.model.multimodal_depth = 1
    config.batch_size = 16
    config.total_steps = 40
    config.checkpoint_every_steps = 2
    with pytest.raises(train.NonFiniteLossError, match=r"loss/caption is nan at step 5"):
        train.train_and_evaluate(config, str(tmp_path))
    checkpointer = ckpt.Checkpointer(str(tmp_path), async_save=False)
    assert list(checkpointer.all_steps()) == [2, 4]
    checkpointer.close()
    params = ckpt.load_params(str(tmp_path))
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def _env(cache_dir: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(
        JAX_PLATFORMS="cpu",
        JAX_COMPILATION_CACHE_DIR=cache_dir,
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )
    return env


def test_unknown_config_key_is_rejected(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "sycoca_jax.main",
            f"--config={ROOT / 'configs' / 'sycoca.py'}:tiny",
            f"--workdir={tmp_path}",
            "--config.optim.learning_rate=0.1",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=_env(str(tmp_path / "cache")),
        timeout=120,
    )
    assert result.returncode != 0
    assert "learning_rate" in result.stderr
    assert not (tmp_path / "checkpoints").exists()
