r"""Compile the training step for a TPU slice from any machine, and report per-device memory.

  python -m sycoca_jax.tools.compile_for --config=configs/sycoca.py:size=B/16 \
      --flagfile=launch/recipes/v5p-128.flags --topology=v5p-128 [--json]

Shows, before renting the hardware, whether a config (model, batch, mesh) fits: the step is
lowered and compiled by the TPU compiler for the target's devices, exactly as ``train.step`` does it
on the real slice, and ``memory_analysis()`` gives the per-device bytes. ``--topology`` takes the
Cloud name of a slice (``v4-32``, ``v5e-64``/``v5litepod-64``, ``v5p-128``, ``v6e-256``) or
libtpu's form (``v5p:4x4x4``).

On paper, it also reports the compiled step's FLOPs and HBM bytes per chip (XLA's cost
analysis), the roofline lower bound on the step time from the chip's peak FLOP/s and bandwidth
(``sycoca_jax.hardware``), and the MFU ceiling that bound implies (``sycoca_jax.tools.roofline``).
``--contrastive_batch=65536`` compiles only the contrastive loss at that batch and reports whether
its B×B logits are split over the chips.

Needs the TPU compiler, which ships in the ``libtpu`` package (``pip install -e '.[tpu]'``; it
runs on CPU-only hosts too). Without it the tool says so and exits with status 2. Exit status 0:
compiled and fits; 1: does not fit the chip's memory; 3: a bad --topology or config; 4: the TPU
compiler crashed (it aborts on internal errors, so the compile runs in a child process and the
crash is reported in one line).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from absl import app, flags, logging
from jax.sharding import AxisType, Mesh
from ml_collections import config_flags

from sycoca_jax import binaries, flops, sharding
from sycoca_jax.tools import roofline
from sycoca_jax.tools.tpu_slices import TpuTarget, parse_topology
from sycoca_jax.train import setup as train_setup
from sycoca_jax.train import step as train_step

NOMINAL_TRAIN_EXAMPLES = 10_000_000
EXIT_FITS, EXIT_TOO_BIG, EXIT_NO_TPU_COMPILER, EXIT_BAD_INPUT, EXIT_COMPILER_CRASHED = 0, 1, 2, 3, 4
_CHILD_ENV = "SYCOCA_COMPILE_FOR_CHILD"


class TpuCompilerUnavailable(RuntimeError):
    """This installation cannot compile for TPUs (no libtpu, or libtpu refuses the target)."""


# ------------------------------------------------------------------------------- the compiler
def tpu_compiler_missing() -> str | None:
    """Why this installation cannot compile for TPU, or None when it can (as far as we can tell
    without loading it)."""
    path = os.environ.get("TPU_LIBRARY_PATH")
    if path and os.path.isfile(path):
        return None
    try:
        if importlib.util.find_spec("libtpu") is not None:
            return None
    except (ImportError, ValueError):
        pass
    return (
        f"this installation cannot compile for TPU: the TPU compiler ships in the libtpu package, "
        f"which is not installed (jax {jax.__version__}). Install the libtpu matching this jax "
        "with `pip install -e '.[tpu]'` (it runs on CPU-only machines too), or run this on a "
        "TPU VM."
    )


def target_devices(target: TpuTarget) -> list[Any]:
    """Compile-only devices of the slice (they carry coordinates and host ids, no memory)."""
    reason = tpu_compiler_missing()
    if reason:
        raise TpuCompilerUnavailable(reason)
    # libtpu takes a machine-wide lock for the TPU chips; compiling touches none, so two
    # compiles (or a compile next to a TPU job) may share the machine.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    try:
        description = topologies.get_topology_desc(
            target.libtpu_topology,
            "tpu",
            chip_config_name=target.chip_config,
            chips_per_host_bounds=target.chips_per_host_bounds,
            num_slices=1,
            wrap=list(target.wrap),
        )
    except Exception as e:  # libtpu reports as RuntimeError/XlaRuntimeError/ValueError
        raise TpuCompilerUnavailable(
            f"libtpu could not describe {target.name} ({target.libtpu_topology}): {e}"
        ) from e
    return list(description.devices)


def target_mesh(mesh_shape: Sequence[int], devices: Sequence[Any]) -> Mesh:
    """The config's mesh over the target's devices, laid out along the physical torus the way
    ``jax.make_mesh`` does it on the real slice."""
    from jax.experimental import mesh_utils

    shape = sharding.resolve_mesh_shape(mesh_shape, len(devices))
    try:
        grid = mesh_utils.create_device_mesh(shape, list(devices))
    except (AssertionError, NotImplementedError, ValueError) as e:
        logging.warning("no topology-aware layout for mesh %s (%s); using device order", shape, e)
        grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, sharding.MESH_AXES, axis_types=(AxisType.Auto,) * len(sharding.MESH_AXES))


def _gib(n: int | float) -> float:
    return round(n / 2**30, 3)


def compile_for(config: Any, target: TpuTarget) -> dict[str, Any]:
    """Compile ``config``'s train step for ``target``; the report says what each device holds.

    ``peak_gib`` is the compiler's peak of live memory on one device where it reports one
    (``peak_memory_in_bytes``), else arguments + outputs − aliased (donated) buffers +
    temporaries + code. The TPU compiler itself refuses a program that cannot fit its HBM;
    that is reported as ``fits: false`` with the compiler's message.
    """
    devices = target_devices(target)
    mesh = target_mesh(config.mesh.shape, devices)
    report: dict[str, Any] = {
        "topology": target.name,
        "libtpu_topology": target.libtpu_topology,
        "device_kind": devices[0].device_kind,
        "num_devices": len(devices),
        "num_hosts": len({d.process_index for d in devices}),
        "mesh": dict(mesh.shape),
        "rules": config.mesh.rules,
        "batch_size": config.batch_size,
        "per_device_batch": config.batch_size / sharding.batch_shards(mesh),
        "microbatches": config.microbatches,
        "hbm_gib": target.hbm_gib,
    }
    # Epoch-based durations need a dataset size; only the schedule's length depends on it, never
    # the compiled program, so a nominal one serves.
    setup = train_setup.make_setup(config, mesh, num_train_examples=NOMINAL_TRAIN_EXAMPLES)
    start = time.perf_counter()
    try:
        compiled, _ = train_step.compile_train_step(setup)
    except Exception as e:  # the TPU compiler refuses programs that exceed HBM
        if "RESOURCE_EXHAUSTED" not in str(e) and "Ran out of memory" not in str(e):
            raise
        report.update(
            compile_seconds=round(time.perf_counter() - start, 1),
            fits=False,
            error=str(e).strip().splitlines()[0][:500],
        )
        return report
    report["compile_seconds"] = round(time.perf_counter() - start, 1)
    memory = compiled.memory_analysis()
    if memory is None:
        report["fits"] = None
        return report
    sizes = {
        "argument_gib": memory.argument_size_in_bytes,
        "output_gib": memory.output_size_in_bytes,
        "alias_gib": memory.alias_size_in_bytes,
        "temp_gib": memory.temp_size_in_bytes,
        "generated_code_gib": memory.generated_code_size_in_bytes,
        "host_temp_gib": getattr(memory, "host_temp_size_in_bytes", 0),
    }
    report.update({k: _gib(v) for k, v in sizes.items()})
    # The compiler's own peak (its heap simulation) where it reports one; else the sum.
    peak = getattr(memory, "peak_memory_in_bytes", 0) or (
        sizes["argument_gib"]
        + sizes["output_gib"]
        - sizes["alias_gib"]
        + sizes["temp_gib"]
        + sizes["generated_code_gib"]
    )
    report["peak_gib"] = _gib(peak)
    report["fits"] = peak <= target.hbm_gib * 2**30
    analytic = flops.train_flops_per_example(config.model) * config.batch_size / len(devices)
    report.update(roofline.step_cost(compiled, analytic, target.chip, bool(config.model.scan)))
    return report


def compile_contrastive_for(config: Any, target: TpuTarget, batch_size: int) -> dict[str, Any]:
    """The contrastive loss alone at ``batch_size`` on ``target`` (see
    ``roofline.contrastive_loss_memory``): is the B×B logits matrix split over the chips?"""
    devices = target_devices(target)
    mesh = target_mesh(config.mesh.shape, devices)
    sharding.check_batch_size(batch_size, mesh)
    report = {"topology": target.name, "mesh": dict(mesh.shape)}
    rules = sharding.logical_rules(config.mesh.rules)
    report.update(roofline.contrastive_loss_memory(mesh, rules, batch_size, config.model.embed_dim))
    return report


def _print(report: dict[str, Any]) -> None:
    for key, value in report.items():
        print(f"{key:<28}{value}")
    if report.get("fits") is False:
        print(
            f"does not fit: {report['topology']} has {report['hbm_gib']} GiB per device. Try "
            "--config.mesh.rules=fsdp with an fsdp mesh axis, --config.model.remat=full, "
            "--config.microbatches=k or a smaller --config.batch_size."
        )


def _libtpu_version() -> str:
    try:
        return importlib.metadata.version("libtpu")
    except importlib.metadata.PackageNotFoundError:
        return os.environ.get("TPU_LIBRARY_PATH", "unknown")


def _compile_in_child(topology: str) -> int:
    """Run this command again in a child process and relay its output. The TPU compiler aborts
    its process on an internal error (a failed CHECK), which no Python handler survives; from
    outside, a crash becomes a plain report instead of a core dump."""
    env = {**os.environ, _CHILD_ENV: "1"}
    command = [sys.executable, "-m", "sycoca_jax.tools.compile_for", *sys.argv[1:]]
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    sys.stdout.write(result.stdout)
    if result.returncode >= 0:
        sys.stderr.write(result.stderr)
        return result.returncode
    failed = [line for line in result.stderr.splitlines() if "Check failed" in line]
    print(
        f"compile_for: the TPU compiler (libtpu {_libtpu_version()}) crashed while compiling "
        f"this config for {topology} (signal {-result.returncode}): "
        f"{failed[0].strip() if failed else result.stderr.strip()[-500:]}\n"
        "This is a compiler bug, not a memory verdict, and the same program would crash on "
        "the real slice. Another per-device batch, mesh or libtpu version may compile.",
        file=sys.stderr,
    )
    return EXIT_COMPILER_CRASHED


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    if not os.environ.get(_CHILD_ENV) and tpu_compiler_missing() is None:
        sys.exit(_compile_in_child(flags.FLAGS.topology))
    # The host only lowers; the TPU target comes from libtpu's topology description.
    if "JAX_PLATFORMS" not in os.environ:
        jax.config.update("jax_platforms", "cpu")
    try:
        target = parse_topology(flags.FLAGS.topology)
        config = binaries.config_from_flags()
        if flags.FLAGS.contrastive_batch:
            report = compile_contrastive_for(config, target, flags.FLAGS.contrastive_batch)
        else:
            report = compile_for(config, target)
    except TpuCompilerUnavailable as e:
        print(f"compile_for: {e}", file=sys.stderr)
        sys.exit(EXIT_NO_TPU_COMPILER)
    except ValueError as e:
        print(f"compile_for: {e}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    if flags.FLAGS.json:
        print(json.dumps(report))
    else:
        _print(report)
    sys.exit(EXIT_FITS if report.get("fits") is not False else EXIT_TOO_BIG)


def define_flags() -> None:
    """Flags are defined here, not at import, so importing this module has no side effects."""
    config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
    flags.DEFINE_string("topology", None, "TPU slice: v4-32, v5e-64, v5p-128, v5p:4x4x4, ...")
    flags.DEFINE_bool("json", False, "Print one JSON object.")
    flags.DEFINE_integer(
        "contrastive_batch",
        0,
        "Compile only the contrastive loss at this global batch (e.g. CoCa's 65536) and report "
        "its per-device memory against the full B×B logits.",
    )
    flags.mark_flags_as_required(["config", "topology"])


if __name__ == "__main__":
    define_flags()
    binaries.run_app(main)
