"""Console scripts: setup.cfg's entry points resolve to each binary's ``run`` and run installed."""

from __future__ import annotations

import configparser
import importlib
import importlib.metadata
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT

SCRIPTS = {
    "sycoca-train": "sycoca_jax.main:run",
    "sycoca-eval": "sycoca_jax.evaluate:run",
    "sycoca-transfer": "sycoca_jax.transfer.__main__:run",
    "sycoca-prepare": "sycoca_jax.data.prepare:run",
}
REINSTALL = "reinstall the package (pip install -e .) so its entry points are current"


def _declared() -> dict[str, str]:
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    lines = parser["options.entry_points"]["console_scripts"].strip().splitlines()
    return dict(tuple(part.strip() for part in line.split("=")) for line in lines)


def _installed() -> dict[str, importlib.metadata.EntryPoint]:
    entry_points = importlib.metadata.distribution("sycoca_jax").entry_points
    return {ep.name: ep for ep in entry_points if ep.group == "console_scripts"}


def test_setup_cfg_declares_every_binary():
    assert _declared() == SCRIPTS


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_installed_entry_point_resolves_to_the_binarys_run(name):
    installed = _installed()
    assert name in installed, f"{name} is not installed: {REINSTALL}"
    assert installed[name].value == SCRIPTS[name], REINSTALL
    target = installed[name].load()
    module, attr = SCRIPTS[name].split(":")
    assert callable(target)
    assert target is getattr(importlib.import_module(module), attr)


def _script(name: str) -> str:
    found = shutil.which(name, path=str(Path(sys.executable).parent))
    assert found, f"{name} is not next to {sys.executable}: {REINSTALL}"
    return found


def test_installed_train_script_prints_its_help():
    result = subprocess.run(
        [_script("sycoca-train"), "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 1, result.stderr  # absl exits 1 after printing --help
    assert "Traceback" not in result.stderr, result.stderr
    assert "Train SyCoCa" in result.stdout  # the binary's docstring, as under python -m
    for flag in ("--config", "--workdir", "--coordinator_address"):
        assert flag in result.stdout, flag


def test_installed_script_rejects_stray_arguments():
    config = f"--config={ROOT / 'configs' / 'sycoca.py'}:tiny"
    result = subprocess.run(
        [_script("sycoca-eval"), config, "--workdir=/nonexistent", "extra"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "unexpected arguments: ['extra']" in result.stderr
