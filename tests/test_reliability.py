"""End to end through ``sycoca_jax.main`` / ``train_and_evaluate``: one run per workdir, a changed
config is not resumed silently, a damaged newest checkpoint falls back to the previous step and
the run ends bit for bit where an undamaged one ends, kills leave one metrics record per step.

One tiny run (8 steps, checkpoints at 4 and 8) is trained once per module; each case works on
a copy of it. Compiled programs go to a persistent cache shared with the subprocesses, so a
resumed run or a second process does not compile again.
"""

from __future__ import annotations

import collections
import json
import logging
import pathlib
import shutil
import signal
import subprocess
import time

import jax
import pytest

from sycoca_jax import checkpoint as ckpt
from sycoca_jax.config_diff import ConfigChangedError
from sycoca_jax.metrics import read_metrics
from sycoca_jax.tools import damage, fault_drill, inspect_checkpoint
from sycoca_jax.train import pretrain
from sycoca_jax.workdir_lock import LEASE_NAME
from tests.helpers import SMALL_NAME, config_for

TOTAL, EVERY = 8, 4


def _values(data_dir: str) -> dict:
    return fault_drill.overrides(SMALL_NAME, data_dir, TOTAL, EVERY)


def _config(data_dir: str):
    config = config_for("tiny")
    for key, value in _values(data_dir).items():
        *parents, leaf = key.split(".")
        node = config
        for name in parents:
            node = node[name]
        node[leaf] = value
    return config


def _training_steps(workdir: str) -> collections.Counter:
    return collections.Counter(r["step"] for r in read_metrics(workdir) if "loss" in r)


def _one_record_per_step(workdir: str) -> bool:
    return _training_steps(workdir) == collections.Counter(range(1, TOTAL + 1))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """A persistent compilation cache for this module's runs, in and out of process."""
    path = str(tmp_path_factory.mktemp("jax_cache"))
    names = (
        "jax_compilation_cache_dir",
        "jax_persistent_cache_min_compile_time_secs",
        "jax_persistent_cache_min_entry_size_bytes",
    )
    before = {name: getattr(jax.config, name) for name in names}
    for name, value in zip(names, (path, 0, 0), strict=True):
        jax.config.update(name, value)
    yield path
    for name, value in before.items():
        jax.config.update(name, value)


@pytest.fixture(scope="module")
def trained(data_dir, cache_dir, tmp_path_factory) -> tuple[str, str]:
    """(workdir, digest of its final parameters) of an undisturbed run."""
    workdir = str(tmp_path_factory.mktemp("trained"))
    pretrain.train_and_evaluate(_config(data_dir), workdir)
    assert fault_drill.committed_steps(workdir) == [EVERY, TOTAL]
    assert _one_record_per_step(workdir)
    return workdir, inspect_checkpoint.inspect(workdir)["digest"]


@pytest.fixture
def copy(trained, tmp_path) -> str:
    target = tmp_path / "run"
    shutil.copytree(trained[0], target, ignore=shutil.ignore_patterns("tensorboard"))
    return str(target)


def _step_dir(workdir: str, step: int) -> pathlib.Path:
    return pathlib.Path(workdir) / ckpt.CHECKPOINT_DIR / str(step)


@pytest.mark.parametrize("variant", sorted(damage.DAMAGES))
def test_damaged_latest_checkpoint_falls_back_and_ends_like_an_undamaged_run(
    variant, copy, trained, data_dir, caplog
):
    damage.DAMAGES[variant](_step_dir(copy, TOTAL))
    with caplog.at_level(logging.WARNING):
        pretrain.train_and_evaluate(_config(data_dir), copy)
    lines = [r.getMessage() for r in caplog.records if "cannot be restored" in r.getMessage()]
    assert len(lines) == 1 and f"step {TOTAL}" in lines[0] and "\n" not in lines[0], lines
    if variant == "bytes_flipped":  # caught by the checksums, or by zstd's own frame check
        assert "checksum mismatch" in lines[0] or "corrupt" in lines[0], lines[0]
    assert fault_drill.set_aside_steps(copy) == [TOTAL]
    assert fault_drill.committed_steps(copy) == [EVERY, TOTAL]
    assert inspect_checkpoint.inspect(copy)["digest"] == trained[1]
    assert _one_record_per_step(copy), _training_steps(copy)


def test_resume_with_a_changed_batch_size_is_refused_naming_the_field(copy, data_dir):
    shutil.rmtree(_step_dir(copy, TOTAL))  # a run to resume
    before = (pathlib.Path(copy) / "metrics.jsonl").read_bytes()
    config = _config(data_dir)
    config.batch_size = 8
    with pytest.raises(ConfigChangedError) as raised:
        pretrain.train_and_evaluate(config, copy)
    message = str(raised.value)
    assert "\n" not in message
    assert "batch_size 16 → 8" in message
    assert "--config.allow_config_change=batch_size" in message
    # Nothing was written: same metrics, same checkpoint, the lease released.
    assert (pathlib.Path(copy) / "metrics.jsonl").read_bytes() == before
    assert fault_drill.committed_steps(copy) == [EVERY]
    assert not (pathlib.Path(copy) / LEASE_NAME).exists()


def test_an_accepted_change_is_logged_to_metrics_and_kept_in_the_checkpoint(
    copy, trained, data_dir
):
    shutil.rmtree(_step_dir(copy, TOTAL))
    config = _config(data_dir)
    config.seed = 5  # defining (initialisation), accepted; unused when resuming
    config.allow_config_change = "seed"
    config.log_every_steps = 2  # safe: logged, not refused
    pretrain.train_and_evaluate(config, copy)
    changes = [r for r in read_metrics(copy) if "config_change" in r]
    assert len(changes) == 1 and changes[0]["step"] == EVERY
    assert changes[0]["config_change"]["accepted"] == {"seed": [0, 5]}
    assert changes[0]["config_change"]["safe"] == {"log_every_steps": [1, 2]}
    history = json.loads((_step_dir(copy, TOTAL) / "history" / "metadata").read_text())
    assert history == [{"step": EVERY, **{k: v for k, v in changes[0].items() if k != "step"}}]
    assert inspect_checkpoint.inspect(copy)["digest"] == trained[1]
    # Every step up to the resumed one keeps its record; after it, every second step.
    assert sorted(_training_steps(copy)) == [1, 2, 3, 4, 6, 8]


def _env(cache_dir: str) -> dict[str, str]:
    env = fault_drill.environment(cache_dir)
    env["JAX_COMPILATION_CACHE_DIR"] = cache_dir
    return env


def test_a_second_run_on_a_busy_workdir_is_refused_in_one_line(
    trained, data_dir, cache_dir, tmp_path
):
    workdir = str(tmp_path / "shared")
    command = fault_drill.command(workdir, _values(data_dir))
    first = subprocess.Popen(command, env=_env(cache_dir), stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not (pathlib.Path(workdir) / LEASE_NAME).exists():
            assert first.poll() is None, first.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "the first run never took the workdir"
            time.sleep(0.05)
        first.send_signal(signal.SIGSTOP)  # busy for as long as the second run needs
        try:
            second = subprocess.run(
                [*command[:-1], "--config.optim.lr=0.1"],  # another run, another lr
                env=_env(cache_dir),
                capture_output=True,
                text=True,
                timeout=300,
            )
        finally:
            first.send_signal(signal.SIGCONT)
        _, first_err = first.communicate(timeout=600)
    finally:
        if first.poll() is None:
            first.kill()
    assert second.returncode == 1, second.stderr[-3000:]
    errors = [line for line in second.stderr.splitlines() if "error:" in line]
    assert "Traceback" not in second.stderr
    assert len(errors) == 1, second.stderr[-3000:]
    assert f"pid {first.pid}" in errors[0] and "--force_unlock" in errors[0], errors[0]
    assert first.returncode == 0, first_err[-3000:]
    assert inspect_checkpoint.inspect(workdir)["digest"] == trained[1]
    assert _one_record_per_step(workdir), _training_steps(workdir)
    assert not (pathlib.Path(workdir) / LEASE_NAME).exists()


def _drill_root(trained, tmp_path) -> pathlib.Path:
    """A drill folder whose reference run is this module's (the same command line)."""
    root = tmp_path / "drill"
    shutil.copytree(trained[0], root / "reference", ignore=shutil.ignore_patterns("tensorboard"))
    return root


def _fingerprints(workdir: str) -> dict[int, int]:
    """Data-order fingerprint per step (the last record where a step was logged twice)."""
    return {r["step"]: r["data/batch_fingerprint"] for r in read_metrics(workdir) if "loss" in r}


def test_sigterm_checkpoints_its_own_step_and_the_resumed_run_ends_exactly(
    trained, data_dir, cache_dir, tmp_path
):
    """SIGTERM after step EVERY + 1: the run saves the step it stopped at (not a cadence step)
    and exits 0; the resumed run sees the same batches and ends with the undisturbed digest."""
    workdir, values, env = str(tmp_path / "sigterm"), _values(data_dir), _env(cache_dir)
    logged = fault_drill.interrupt(workdir, values, env, signal.SIGTERM, after_step=EVERY + 1)
    assert logged >= EVERY + 1, logged
    saved = fault_drill.committed_steps(workdir)[-1]
    assert EVERY < saved < TOTAL, f"SIGTERM should save at its own step, got {saved}"
    fault_drill.run_to_end(workdir, values, env)
    assert inspect_checkpoint.inspect(workdir)["digest"] == trained[1]
    assert _fingerprints(workdir) == _fingerprints(trained[0])
    assert _one_record_per_step(workdir), _training_steps(workdir)


@pytest.mark.slow
def test_fault_drill_kill9_sigterm_and_damage_end_like_an_undisturbed_run(
    trained, data_dir, cache_dir, tmp_path
):
    """Seed 19 draws kill -9 twice (both before the first checkpoint, so whatever the timing),
    SIGTERM, damage of the checkpoint it saved, then (unless SIGTERM stopped at the last step)
    kill -9 after the fallback; one undisturbed run finishes."""
    root = _drill_root(trained, tmp_path)
    report = fault_drill.drill(
        str(root),
        rounds=5,
        seed=19,
        total_steps=TOTAL,
        checkpoint_every_steps=EVERY,
        data_dir=data_dir,
        cache_dir=cache_dir,
    )
    assert report.ok, report.lines()
    assert report.kills["kill9"] >= 2 and report.kills["sigterm"] >= 1, report.lines()
    assert report.damaged and report.recovered, report.lines()
    assert (report.records_lost, report.records_duplicated) == (0, 0), report.lines()
    assert _fingerprints(str(root / "drill")) == _fingerprints(trained[0])
