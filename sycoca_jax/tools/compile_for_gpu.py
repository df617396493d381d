r"""Compile the training step for an NVIDIA GPU on a machine without one; report its memory and
the kernels it would launch.

  python -m sycoca_jax.tools.compile_for_gpu --config=configs/benchmark.py:openclip_b32 \
      --gpu=h200 [--sweep='model.scan=true,false'] [--num_gpus=1] [--top=15] [--json] \
      [--hlo_dir=DIR]

XLA's GPU compiler runs without a GPU when told the target's properties (SM count, shared
memory, L2, compute capability: ``TARGETS`` below) and when GEMM autotuning is off: cuBLAS
picks its GEMMs by heuristics, and Triton GEMMs are off (their tiling needs timings), so an
operand conversion a Triton GEMM would absorb stays a kernel of its own. The rest (fusion,
layout, scheduling, cuDNN attention, while-loop double buffering) is the GPU's program.
Per point of the sweep, one report: the compiled memory (temporaries and peak per device,
as ``tools.benchmark`` reports them on the GPU) and ``tools.kernel_census`` of the program:
kernel launches per step, bytes moved, and two lower bounds on the step time, the analytic
FLOPs at the chip's peak and the non-matmul traffic at its HBM bandwidth.

Checked against seven steps measured on one H200 (jax 0.11.2 there, 0.10.2 here): compiled
temporaries within 0.6 GiB of the GPU's own for the three ``remat=dots``/``full`` steps, and
2.6-5.2 GiB (5-7 %) above it for the four without remat; 7,198 kernels per CoCa-B/32 step against
7,673 traced. docs/performance.md sets the time estimates beside the measured steps.

XLA_FLAGS already set are kept (``source launch/xla_gpu.env`` first to compile as the GPU
launchers do). Needs jax's CUDA plugin, ``pip install -e '.[cuda]'`` (about 5 GB of CUDA
libraries; no GPU or driver needed). Exit status
0: compiled; 1: a point failed to compile; 2: the CUDA plugin is not installed; 3: a bad flag or
config.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import sys
import traceback
from typing import Any

import jax
import numpy as np
from absl import app, flags, logging
from jax.sharding import AxisType, Mesh
from ml_collections import config_flags

from sycoca_jax import binaries, hardware, sharding
from sycoca_jax.tools import benchmark, kernel_census
from sycoca_jax.train import step as train_step

EXIT_OK, EXIT_FAILED, EXIT_NO_CUDA_PLUGIN, EXIT_BAD_INPUT = 0, 1, 2, 3
# Deviceless compilation cannot time GEMM candidates, and Triton GEMM tiling without timings
# fails on some shapes; cuBLAS's heuristics choose instead.
DEVICELESS_XLA_FLAGS = ("--xla_gpu_autotune_level=0", "--xla_gpu_enable_triton_gemm=false")


@dataclasses.dataclass(frozen=True)
class GpuTarget:
    """What XLA's GPU compiler needs to know of a chip (NVIDIA's published figures)."""

    chip: str  # key of hardware.CHIPS: memory size and bandwidth come from there
    compute_capability: tuple[int, int]
    sm_count: int
    clock_ghz: float
    l2_bytes: int
    shared_memory_per_sm: int
    shared_memory_per_block_optin: int


TARGETS = {
    "h100": GpuTarget("h100", (9, 0), 132, 1.98, 50 * 2**20, 228 * 1024, 227 * 1024),
    "h200": GpuTarget("h200", (9, 0), 132, 1.98, 50 * 2**20, 228 * 1024, 227 * 1024),
    "a100": GpuTarget("a100", (8, 0), 108, 1.41, 40 * 2**20, 164 * 1024, 163 * 1024),
}


class CudaPluginUnavailable(RuntimeError):
    """This installation has no CUDA compiler plugin for jax."""


def target_config(name: str) -> str:
    """The ``GpuTargetConfigProto`` (text format) XLA compiles against for GPU ``name``."""
    if name not in TARGETS:
        raise ValueError(f"unknown --gpu {name!r}; known: {', '.join(TARGETS)}")
    t, chip = TARGETS[name], hardware.CHIPS[TARGETS[name].chip]
    major, minor = t.compute_capability
    info = {
        "threads_per_block_limit": 1024,
        "threads_per_warp": 32,
        "shared_memory_per_block": 48 * 1024,
        "shared_memory_per_core": t.shared_memory_per_sm,
        "threads_per_core_limit": 2048,
        "core_count": t.sm_count,
        "fpus_per_core": 128 if major >= 9 else 64,
        "block_dim_limit_x": 2**31 - 1,
        "block_dim_limit_y": 65535,
        "block_dim_limit_z": 65535,
        "memory_bandwidth": int(chip.hbm_bytes_per_s),
        "l2_cache_size": t.l2_bytes,
        "clock_rate_ghz": t.clock_ghz,
        "device_memory_size": int(chip.hbm_gib * 2**30),
        "shared_memory_per_block_optin": t.shared_memory_per_block_optin,
        "registers_per_core_limit": 65536,
        "registers_per_block_limit": 65536,
    }
    body = "\n".join(f"  {key}: {value}" for key, value in info.items())
    capability = f"cuda_compute_capability {{ major: {major} minor: {minor} }}"
    return (
        f"gpu_device_info {{\n{body}\n  {capability}\n}}\n"
        f'platform_name: "CUDA"\ndnn_version_info {{ major: 9 minor: 8 patch: 0 }}\n'
        f'device_description_str: "{chip.name}"\n'
    )


def cuda_plugin_missing() -> str | None:
    """Why jax here cannot compile for CUDA, or None when its plugin is installed."""
    try:
        if importlib.util.find_spec("jax_plugins.xla_cuda12") is not None:
            return None
    except (ImportError, ValueError):
        pass
    return (
        "this installation cannot compile for NVIDIA GPUs: jax's CUDA plugin is not installed "
        f"(jax {jax.__version__}). Install it with `pip install -e '.[cuda]'` or "
        f'`pip install "jax[cuda12]=={jax.__version__}"` (no GPU or driver is needed to compile).'
    )


def prepare_environment() -> None:
    """Before jax starts its backends: compile-only CUDA (no driver is looked for) with
    deviceless GEMM selection, keeping the XLA flags already set."""
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
    flags_now = os.environ.get("XLA_FLAGS", "")
    extra = [f for f in DEVICELESS_XLA_FLAGS if f.split("=")[0] not in flags_now]
    os.environ["XLA_FLAGS"] = " ".join([flags_now, *extra]).strip()
    jax.config.update("jax_platforms", "cpu")


def gpu_mesh(config: Any, gpu: str, num_gpus: int) -> Mesh:
    """The config's mesh over ``num_gpus`` compile-only GPUs of kind ``gpu``."""
    reason = cuda_plugin_missing()
    if reason:
        raise CudaPluginUnavailable(reason)
    from jax.experimental import topologies

    description = topologies.get_topology_desc(
        platform="cuda", topology=f"1x1x{num_gpus}", target_config=target_config(gpu)
    )
    devices = list(description.devices)
    shape = sharding.resolve_mesh_shape(config.mesh.shape, len(devices))
    return Mesh(
        np.asarray(devices).reshape(shape),
        sharding.MESH_AXES,
        axis_types=(AxisType.Auto,) * len(sharding.MESH_AXES),
    )


def compile_point(
    config: Any, gpu: str, num_gpus: int, top: int, hlo_path: str | None = None
) -> dict[str, Any]:
    """Compile ``config``'s train step for ``num_gpus`` GPUs; memory and kernel census. With
    ``hlo_path`` the optimised program is also written there (for ``tools.kernel_census``)."""
    mesh = gpu_mesh(config, gpu, num_gpus)
    compiled, report = train_step.compile_train_step(benchmark.make_setup(config, mesh))
    chip = hardware.CHIPS[TARGETS[gpu].chip]
    peak_gib = report["argument_gib"] + report["temp_gib"]  # as tools.benchmark: state donated
    analytic = report["analytic_tflop_per_device"] * 1e12
    text = compiled.as_text()
    if hlo_path:
        with open(hlo_path, "w") as f:
            f.write(text)
    census = kernel_census.summarise(kernel_census.kernels(text), chip.hbm_bytes_per_s, top)
    return {
        "gpu": chip.name,
        "num_gpus": num_gpus,
        "batch_size": config.batch_size,
        "compile_s": round(report["compile_seconds"], 1),
        "temp_gib": round(report["temp_gib"], 3),
        "compiled_peak_gib": round(peak_gib, 3),
        "fits": peak_gib <= chip.hbm_gib,
        "analytic_tflop_per_device": round(report["analytic_tflop_per_device"], 3),
        "matmul_ms_at_peak": round(analytic / chip.peak_bf16_flops * 1e3, 1),
        **census,
    }


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    prepare_environment()
    f = flags.FLAGS
    try:
        target_config(f.gpu)  # an unknown --gpu fails here, before any compile
        base = binaries.config_from_flags()
        points = benchmark.parse_sweep(f.sweep)
        configs = [(p, benchmark.apply_point(base, p)) for p in points]
    except ValueError as e:
        print(f"compile_for_gpu: {e}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    reason = cuda_plugin_missing()
    if reason:
        print(f"compile_for_gpu: {reason}", file=sys.stderr)
        sys.exit(EXIT_NO_CUDA_PLUGIN)
    status = EXIT_OK
    for index, (point, config) in enumerate(configs):
        hlo_path = None
        if f.hlo_dir:
            os.makedirs(f.hlo_dir, exist_ok=True)
            hlo_path = os.path.join(f.hlo_dir, f"point{index}.hlo")
        try:
            report = {"point": point, **compile_point(config, f.gpu, f.num_gpus, f.top, hlo_path)}
            if hlo_path:
                report["hlo"] = hlo_path
        except Exception as e:  # one point's compile failure (e.g. a kernel's limits) is reported
            traceback.print_exc()
            report = {"point": point, "error": f"{type(e).__name__}: {str(e).splitlines()[0]}"}
            status = EXIT_FAILED
        if f.json:
            print(json.dumps(report), flush=True)
        else:
            print(json.dumps(report["point"]))
            if "error" in report:
                print(f"  failed: {report['error']}")
                continue
            for key in ("gpu", "compile_s", "temp_gib", "compiled_peak_gib", "fits"):
                print(f"  {key:<24}{report[key]}")
            print(f"  {'matmul_ms_at_peak':<24}{report['matmul_ms_at_peak']}")
            print(kernel_census.format_report(report).replace("\n", "\n  ").join(["  ", ""]))
    sys.exit(status)


def define_flags() -> None:
    """Flags are defined here, not at import, so importing this module has no side effects."""
    config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
    flags.DEFINE_string("gpu", "h200", f"GPU to compile for: {', '.join(TARGETS)}.")
    flags.DEFINE_integer("num_gpus", 1, "GPUs in the (single-host) mesh.")
    flags.DEFINE_string("sweep", "", "Points to compile, as tools.benchmark's --sweep.")
    flags.DEFINE_integer("top", 15, "Sources listed, by bytes moved.")
    flags.DEFINE_bool("json", False, "One JSON line per point.")
    flags.DEFINE_string(
        "hlo_dir", None, "Also write each point's optimised program there (point<i>.hlo)."
    )
    flags.mark_flags_as_required(["config"])


if __name__ == "__main__":
    define_flags()
    binaries.run_app(main)
