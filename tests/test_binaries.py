"""Binaries turn the user's mistakes into one line on stderr and exit code 2 (a flag or config
value) or 1 (a path, a checkpoint); unexpected errors keep their traceback. inspect_checkpoint
never writes and accepts a workdir, its checkpoints/ folder or one step folder."""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np
import pytest

from sycoca_jax import binaries
from sycoca_jax import checkpoint as ckpt
from sycoca_jax.errors import ConfigError, UserError
from sycoca_jax.tools import inspect_checkpoint
from tests.helpers import ROOT, one_error_line, run_module

TINY = f"--config={ROOT / 'configs' / 'sycoca.py'}:tiny"


def test_a_misspelt_config_key_is_one_line_naming_the_closest(tmp_path):
    result = run_module(
        "sycoca_jax.main",
        TINY,
        f"--workdir={tmp_path}",
        "--config.optim.learning_rate=1e-3",
        cwd=tmp_path,
    )
    assert result.returncode == 2
    line = one_error_line(result, "sycoca_jax.main")
    assert "did you mean --config.optim.lr?" in line
    assert not any(tmp_path.iterdir())  # nothing was started


def test_a_zero_cadence_fails_before_any_work(tmp_path):
    """Today: the step compiles, then ZeroDivisionError."""
    result = run_module(
        "sycoca_jax.main",
        TINY,
        f"--workdir={tmp_path / 'run'}",
        "--config.checkpoint_every_steps=0",
        "--config.batch_size=-8",
        cwd=tmp_path,
    )
    assert result.returncode == 2
    line = one_error_line(result, "sycoca_jax.main")
    assert "checkpoint_every_steps=0 must be a positive integer" in line
    assert "batch_size=-8 must be a positive integer" in line
    assert not (tmp_path / "run").exists()


def test_evaluate_without_a_checkpoint_is_one_line(tmp_path):
    result = run_module("sycoca_jax.evaluate", TINY, f"--workdir={tmp_path / 'none'}", cwd=tmp_path)
    assert result.returncode == 1
    assert "no checkpoint under" in one_error_line(result, "sycoca_jax.evaluate")


def test_inspect_checkpoint_on_a_file_is_one_line_and_writes_nothing(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("not a checkpoint\n")
    result = run_module("sycoca_jax.tools.inspect_checkpoint", str(readme), cwd=tmp_path)
    assert result.returncode == 1
    assert "no checkpoint at" in one_error_line(result, "sycoca_jax.tools.inspect_checkpoint")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md"]


def test_prepare_with_a_missing_source_is_one_line(tmp_path):
    result = run_module(
        "sycoca_jax.data.prepare",
        "local",
        "--source=/no/such/file.jsonl",
        "--name=pairs",
        f"--data_dir={tmp_path / 'out'}",
        cwd=tmp_path,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert len([line for line in result.stderr.splitlines() if "matches no file" in line]) == 1


# ---------------------------------------------------------------------------- in process
def test_guard_prints_user_errors_and_keeps_other_tracebacks(capsys):
    def busy(_):
        raise UserError("workdir /w is in use by run 12345678")

    def bad_value(_):
        raise ConfigError("batch_size=0 must be a positive integer")

    def bug(_):
        raise RuntimeError("a bug")

    with pytest.raises(SystemExit) as exit_busy:
        binaries.guard(busy)([])
    with pytest.raises(SystemExit) as exit_value:
        binaries.guard(bad_value)([])
    assert (exit_busy.value.code, exit_value.value.code) == (1, 2)
    assert capsys.readouterr().err.count("error:") == 2
    with pytest.raises(RuntimeError, match="a bug"):
        binaries.guard(bug)([])


@pytest.fixture
def small_checkpoint(tmp_path) -> str:
    workdir = str(tmp_path / "run")
    checkpointer = ckpt.Checkpointer(workdir, async_save=False)
    for step in (3, 6):
        params = {
            "image_encoder": {"w": jnp.full((4, 2), float(step))},
            "heads": {"b": jnp.ones(2)},
        }
        checkpointer.save(step, {"step": jnp.asarray(step), "params": params})
    checkpointer.wait()
    checkpointer.close()
    return workdir


def test_inspect_accepts_a_workdir_its_checkpoints_folder_and_a_step_folder(small_checkpoint):
    latest = inspect_checkpoint.inspect(small_checkpoint)
    assert latest["step"] == 6 and latest["params"]["total"] == 10
    folder = os.path.join(small_checkpoint, "checkpoints")
    assert inspect_checkpoint.inspect(folder) == latest
    step_3 = inspect_checkpoint.inspect(os.path.join(folder, "3"))
    assert step_3["step"] == 3 and step_3 == inspect_checkpoint.inspect(small_checkpoint, step=3)
    assert step_3["digest"] != latest["digest"]
    params = ckpt.load_params(small_checkpoint, step=3)
    np.testing.assert_array_equal(params["image_encoder"]["w"], np.full((4, 2), 3.0))
    with pytest.raises(ckpt.CheckpointNotFoundError, match=r"no step 4 \(steps: \[3, 6\]\)"):
        inspect_checkpoint.inspect(small_checkpoint, step=4)
