"""Compile-time and speed plumbing of the launchers: XLA's GPU flags (each known to this jaxlib),
the persistent compilation cache in every launcher and as a config key, and the one-command
device benchmark's script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax

from sycoca_jax import binaries
from tests.helpers import ROOT, config_for
from tests.test_launch import _run, _shellcheck

LAUNCH = ROOT / "launch"


def _sourced(name: str, env: dict[str, str]) -> dict[str, str]:
    out = subprocess.run(
        ["bash", "-c", f"set -euo pipefail; source {LAUNCH / name}; env -0"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    ).stdout
    return dict(item.split("=", 1) for item in out.split("\0") if "=" in item)


def test_gpu_flags_are_known_to_xla_and_yours_win(tmp_path):
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "XLA_FLAGS": "--mine=1"}
    sourced = _sourced("xla_gpu.env", env)
    flags = sourced["XLA_FLAGS"].split()
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in flags
    assert flags[-1] == "--mine=1"  # after ours: a value you set yourself wins
    assert sourced["JAX_COMPILATION_CACHE_DIR"] == f"{tmp_path}/.cache/sycoca_jax/compilation_cache"
    # XLA aborts on an unknown flag; every one of ours parses in this jaxlib.
    ours = " ".join(f for f in flags if f != "--mine=1")
    check = subprocess.run(
        [sys.executable, "-c", "import jax; jax.numpy.zeros(1).block_until_ready()"],
        capture_output=True,
        text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ours},
        timeout=120,
    )
    assert check.returncode == 0, check.stderr[-1000:]
    lint = _run([_shellcheck(), "--shell=bash", str(LAUNCH / "xla_gpu.env")])
    assert lint.returncode == 0, lint.stdout


def test_every_launcher_turns_the_compilation_cache_on():
    for name in ("gpu_slurm.sbatch", "tpu_pod.sh", "local_multiprocess.sh", "device_benchmark.sh"):
        text = (LAUNCH / name).read_text()
        assert "JAX_COMPILATION_CACHE_DIR" in text or "xla_gpu.env" in text, name
    dry = _run(
        [
            "bash",
            str(LAUNCH / "tpu_pod.sh"),
            "--name=n",
            "--zone=z",
            "--accelerator=v5p-8",
            "--workdir=gs://bucket/run",
            "--skip_install",
            "--dry_run",
        ]
    )
    assert dry.returncode == 0, dry.stderr
    assert "JAX_COMPILATION_CACHE_DIR=gs://bucket/run/compilation_cache" in dry.stdout


def test_config_key_sets_the_cache_directory(tmp_path, monkeypatch):
    assert "compilation_cache_dir" in config_for("tiny")
    before = jax.config.jax_compilation_cache_dir
    try:
        assert binaries.enable_compilation_cache(str(tmp_path)) == str(tmp_path)
        assert jax.config.jax_compilation_cache_dir == str(tmp_path)
    finally:
        jax.config.update("jax_compilation_cache_dir", before)


def test_device_benchmark_help_arguments_and_budget(tmp_path):
    script = LAUNCH / "device_benchmark.sh"
    assert _run(["bash", str(script), "--help"]).stdout.startswith("Usage:")
    bad = _run(["bash", str(script), "--budget_s=soon"])
    assert bad.returncode == 2 and "whole number" in bad.stderr
    # No time at all: the host line, then every variant reported as skipped, nothing compiled.
    out = tmp_path / "lines.jsonl"
    env = {**os.environ, "PYTHON": sys.executable, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    result = subprocess.run(
        ["bash", str(script), "--budget_s=0", f"--out={out}"],
        capture_output=True,
        text=True,
        env={k: v for k, v in env.items() if k != "OUT"},
        cwd=tmp_path,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    lines = [json.loads(x) for x in result.stdout.splitlines()]
    assert lines[0]["host"]["jax"] == jax.__version__
    assert lines[0]["host"]["ceilings"]["matmul_bf16_tflops"] > 0
    assert len(lines) == 9 and all(x.get("skipped") for x in lines[1:])  # host + 8 defaults
    assert Path(out).read_text().splitlines() == result.stdout.splitlines()


def test_device_benchmark_drops_an_xla_flag_this_jaxlib_lacks(tmp_path):
    """An unknown flag in XLA_FLAGS aborts XLA at start-up; the launcher names it, drops it and
    measures anyway (a GPU flag list written for one jaxlib must not cost a lease on another).
    ``--bench`` measures the points asked for instead of the default list."""
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    env.update(PYTHON=sys.executable, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_no_such_flag=true")
    result = subprocess.run(
        ["bash", str(LAUNCH / "device_benchmark.sh"), "--budget_s=0", "--bench=b16@batch_size=8"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr
    assert "lacks --xla_no_such_flag" in result.stderr
    host, *points = [json.loads(x) for x in result.stdout.splitlines()]
    assert "xla_no_such_flag" not in host["host"]["xla_flags"]
    # --bench replaces the default list: only the point asked for (skipped: no time left)
    assert [(p["config"], p["sweep"], "skipped" in p) for p in points] == [
        ("b16", "batch_size=8", True)
    ]
