r"""Compile the training step for a TPU slice from any machine, and report per-device memory.

  python -m sycoca_jax.tools.compile_for --config=configs/sycoca.py:size=B/16 \
      --flagfile=launch/recipes/v5p-128.flags --topology=v5p-128 [--json]

Shows, before renting the hardware, whether a config (model, batch, mesh) fits: the step is
lowered and compiled by the TPU compiler for the target's devices, exactly as ``train.py`` does it
on the real slice, and ``memory_analysis()`` gives the per-device bytes. ``--topology`` takes the
Cloud name of a slice (``v4-32``, ``v5e-64``/``v5litepod-64``, ``v5p-128``, ``v6e-256``) or
libtpu's form (``v5p:4x4x4``).

Needs the TPU compiler, which ships in the ``libtpu`` package (``pip install -e '.[tpu]'``; it
runs on CPU-only hosts too). Without it the tool says so and exits with status 2. Exit status 0:
compiled and fits; 1: does not fit the chip's memory; 3: a bad --topology or config; 4: the TPU
compiler crashed (it aborts on internal errors, so the compile runs in a child process and the
crash is reported in one line).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import json
import math
import os
import re
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

from sycoca_jax import binaries, sharding, train

NOMINAL_TRAIN_EXAMPLES = 10_000_000
EXIT_FITS, EXIT_TOO_BIG, EXIT_NO_TPU_COMPILER, EXIT_BAD_INPUT, EXIT_COMPILER_CRASHED = 0, 1, 2, 3, 4
_CHILD_ENV = "SYCOCA_COMPILE_FOR_CHILD"


class TpuCompilerUnavailable(RuntimeError):
    """This installation cannot compile for TPUs (no libtpu, or libtpu refuses the target)."""


@dataclasses.dataclass(frozen=True)
class Generation:
    """What differs between TPU generations for compiling: the slice's shape rank, whether the
    Cloud name counts TensorCores (2 per chip) or chips, and the HBM per chip."""

    libtpu_name: str
    rank: int
    cores_per_chip_in_name: int
    chip_config: str  # "megacore": one JAX device per chip from two TensorCores
    hbm_gib: float


GENERATIONS = {
    "v4": Generation("v4", 3, 2, "megacore", 32.0),
    "v5p": Generation("v5p", 3, 2, "megacore", 95.0),
    "v5e": Generation("v5e", 2, 1, "default", 16.0),
    "v6e": Generation("v6e", 2, 1, "default", 32.0),
}
ALIASES = {"v5litepod": "v5e", "v5": "v5p", "v6": "v6e"}


@dataclasses.dataclass(frozen=True)
class TpuTarget:
    """One TPU slice, in the terms ``jax.experimental.topologies.get_topology_desc`` takes."""

    name: str
    generation: str
    shape: tuple[int, ...]  # chips along each axis of the slice
    chip_config: str
    hbm_gib: float

    @property
    def chips(self) -> int:
        return math.prod(self.shape)

    @property
    def libtpu_topology(self) -> str:
        return f"{GENERATIONS[self.generation].libtpu_name}:{'x'.join(map(str, self.shape))}"

    @property
    def wrap(self) -> tuple[bool, bool, bool]:
        """Torus links: 3-D slices wrap around once every side is at least 4 chips; 2-D slices
        along a full 16-chip side."""
        if len(self.shape) == 3:
            full = min(self.shape) >= 4
            return (full, full, full)
        return (self.shape[0] == 16, self.shape[1] == 16, False)

    @property
    def chips_per_host_bounds(self) -> tuple[int, int, int]:
        """Chips per host along each axis: 2×2, except the single-host 8-chip v5e/v6e slices
        (2×4) and slices smaller than a host."""
        if len(self.shape) == 2 and self.chips == 8:
            return (2, 4, 1)
        if self.chips < 4:
            return (*self.shape, *(1,) * (3 - len(self.shape)))
        return (2, 2, 1)


def _doubling_shape(chips: int, rank: int) -> tuple[int, ...] | None:
    """The standard slice shape for a power-of-two chip count: 3-D 2x2x1, 2x2x2, 2x2x4, 2x4x4,
    4x4x4, 4x4x8, ...; 2-D 2x2, 2x4, 4x4, 4x8, 8x8, 8x16, 16x16. None for other counts."""
    if chips < 1 or chips & (chips - 1):
        return None
    if chips == 1:
        return (1,) * rank
    if chips == 2:
        return (1, 2, 1) if rank == 3 else (1, 2)
    shape = [2, 2, 1] if rank == 3 else [2, 2]
    while math.prod(shape) < chips:
        if rank == 3:
            biggest = max(shape)
            smaller = [i for i, s in enumerate(shape) if s < biggest]
            shape[smaller[-1] if smaller else 2] *= 2
        else:
            shape[1 if shape[0] == shape[1] else 0] *= 2
    return tuple(shape)


def parse_topology(name: str) -> TpuTarget:
    """``v5p-128`` (Cloud name: v4/v5p count TensorCores, v5e/v6e chips) or ``v5p:4x4x4``."""
    text = name.strip().lower()
    if text.startswith("tpu "):
        text = text[4:]
    raw = re.fullmatch(r"([a-z0-9]+):(\d+(?:x\d+)+)", text)
    cloud = re.fullmatch(r"([a-z0-9]+)-(\d+)", text)
    if not (raw or cloud):
        raise ValueError(
            f"--topology={name!r}: give a TPU slice like v4-32, v5e-64, v5p-128, v6e-256 or "
            "libtpu's form like v5p:4x4x4 (GPUs cannot be targeted from here: run "
            "python -m sycoca_jax.tools.benchmark on one GPU node instead)"
        )
    prefix = (raw or cloud).group(1)
    generation = ALIASES.get(prefix, prefix)
    if generation not in GENERATIONS:
        raise ValueError(
            f"--topology={name!r}: unknown TPU generation {prefix!r}; known: "
            f"{', '.join(sorted(GENERATIONS))} (and {', '.join(sorted(ALIASES))})"
        )
    gen = GENERATIONS[generation]
    if raw:
        shape = tuple(int(s) for s in raw.group(2).split("x"))
        if len(shape) != gen.rank:
            raise ValueError(f"--topology={name!r}: {generation} slices have {gen.rank} axes")
    else:
        count = int(cloud.group(2))
        chips, odd = divmod(count, gen.cores_per_chip_in_name)
        shape = None if odd else _doubling_shape(chips, gen.rank)
        if shape is None:
            raise ValueError(
                f"--topology={name!r}: no standard {generation} slice has {count} "
                f"{'TensorCores' if gen.cores_per_chip_in_name == 2 else 'chips'}; give its "
                f"shape instead, e.g. {gen.libtpu_name}:{'x'.join(['4'] * gen.rank)}"
            )
    return TpuTarget(name, generation, shape, gen.chip_config, gen.hbm_gib)


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
    setup = train.make_setup(config, mesh, num_train_examples=NOMINAL_TRAIN_EXAMPLES)
    start = time.perf_counter()
    try:
        compiled, _ = train.compile_train_step(setup)
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
    return report


def _print(report: dict[str, Any]) -> None:
    for key, value in report.items():
        print(f"{key:<22}{value}")
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
        report = compile_for(binaries.config_from_flags(), target)
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
    flags.mark_flags_as_required(["config", "topology"])


if __name__ == "__main__":
    define_flags()
    binaries.run_app(main)
