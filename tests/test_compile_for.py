"""compile_for: TPU slice names, the plain failure without a TPU compiler (forced, so it runs the
same everywhere), and the target's devices and mesh on whatever this machine has installed.

Compiling even the tiny model for a TPU takes the TPU compiler ~40 s on 2 cores, so the compile
itself is exercised by hand (figures in docs/training.md, "Scaling out"), not here.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from sycoca_jax.tools import compile_for
from tests.helpers import ROOT


@pytest.mark.parametrize(
    "name, libtpu, chips, wrap, hosts",
    [
        ("v4-32", "v4:2x2x4", 16, (False, False, False), (2, 2, 1)),
        ("v4-128", "v4:4x4x4", 64, (True, True, True), (2, 2, 1)),
        ("v5p-128", "v5p:4x4x4", 64, (True, True, True), (2, 2, 1)),
        ("v5p-8", "v5p:2x2x1", 4, (False, False, False), (2, 2, 1)),
        ("v5e-64", "v5e:8x8", 64, (False, False, False), (2, 2, 1)),
        ("v5litepod-8", "v5e:2x4", 8, (False, False, False), (2, 4, 1)),
        ("v5e-128", "v5e:8x16", 128, (False, True, False), (2, 2, 1)),
        ("v6e-256", "v6e:16x16", 256, (True, True, False), (2, 2, 1)),
        ("v5p:4x4x8", "v5p:4x4x8", 128, (True, True, True), (2, 2, 1)),
        ("TPU v4:2x2x1", "v4:2x2x1", 4, (False, False, False), (2, 2, 1)),
    ],
)
def test_cloud_names_become_libtpu_topologies(name, libtpu, chips, wrap, hosts):
    target = compile_for.parse_topology(name)
    assert target.libtpu_topology == libtpu
    assert target.chips == chips and target.wrap == wrap
    assert target.chips_per_host_bounds == hosts


def test_hbm_per_generation():
    assert compile_for.parse_topology("v5p-128").hbm_gib == 95.0
    assert compile_for.parse_topology("v5e-64").hbm_gib == 16.0
    assert compile_for.parse_topology("v4-32").chip_config == "megacore"


@pytest.mark.parametrize(
    "name, message",
    [
        ("8xH100", "GPUs cannot be targeted"),
        ("v5p-96", "give its shape instead, e.g. v5p:4x4x4"),
        ("v7x-64", "unknown TPU generation"),
        ("v5e:4x4x4", "v5e slices have 2 axes"),
    ],
)
def test_bad_topologies_say_what_to_give(name, message):
    with pytest.raises(ValueError, match=message):
        compile_for.parse_topology(name)


_WITHOUT_LIBTPU = """
import runpy, sys
sys.modules["libtpu"] = None  # as if the package were not installed
sys.argv = ["compile_for"] + sys.argv[1:]
runpy.run_module("sycoca_jax.tools.compile_for", run_name="__main__")
"""


def test_without_a_tpu_compiler_it_says_so_and_exits_non_zero():
    env = {"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin", "TPU_LIBRARY_PATH": "/nonexistent"}
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            _WITHOUT_LIBTPU,
            f"--config={ROOT / 'configs' / 'sycoca.py'}:size=B/16",
            "--topology=v5p-128",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=120,
    )
    assert result.returncode == compile_for.EXIT_NO_TPU_COMPILER, result.stderr[-2000:]
    assert "cannot compile for TPU" in result.stderr
    assert "pip install -e '.[tpu]'" in result.stderr
    assert result.stdout == ""


def test_target_devices_and_mesh_on_this_machine():
    """With libtpu installed: the slice's compile-only devices and a torus-aware mesh; without:
    the same plain refusal as the command line's."""
    target = compile_for.parse_topology("v5p-128")
    if compile_for.tpu_compiler_missing() is not None:
        with pytest.raises(compile_for.TpuCompilerUnavailable, match="pip install"):
            compile_for.target_devices(target)
        return
    devices = compile_for.target_devices(target)
    assert len(devices) == 64
    assert len({d.process_index for d in devices}) == 16  # 4 chips per host
    mesh = compile_for.target_mesh((1, -1, 1), devices)
    assert dict(mesh.shape) == {"data": 1, "fsdp": 64, "tensor": 1}
    assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in devices)


def test_a_compiler_crash_becomes_a_one_line_report(monkeypatch, capsys):
    """libtpu aborts on internal errors; the parent process turns that into a plain report."""
    crash = subprocess.CompletedProcess(
        args=[],
        returncode=-6,
        stdout="",
        stderr="noise\nF1127 fusion_emitter.cc:418] Check failed: a == b (1 vs. 8)\n*** trace\n",
    )
    monkeypatch.setattr(compile_for.subprocess, "run", lambda *a, **k: crash)
    assert compile_for._compile_in_child("v5p-128") == compile_for.EXIT_COMPILER_CRASHED
    err = capsys.readouterr().err
    assert "TPU compiler" in err and "crashed" in err and "v5p-128" in err
    assert "Check failed: a == b (1 vs. 8)" in err and "not a memory verdict" in err
