r"""Steady-state training-step speed of a config on the devices present, on synthetic batches.

  python -m sycoca_jax.tools.benchmark --config=configs/sycoca.py:size=B/16 \
      --config.batch_size=256 [--steps=20] [--warmup=5] [--json]

Reports compile time, seconds per step, examples/s (total and per device), TFLOP/s per device and
MFU from the analytic FLOP count, and peak device memory where the backend reports it. The input
pipeline is measured separately by ``python -m sycoca_jax.data.benchmark``.
"""

from __future__ import annotations

import json
import time
from typing import Any

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from sycoca_jax import binaries, flops, hardware, sharding
from sycoca_jax.train import setup as train_setup
from sycoca_jax.train import step as train_step


def synthetic_batch(
    config: Any, setup: train_setup.TrainSetup, seed: int = 0
) -> dict[str, jax.Array]:
    """Random images and captions of realistic lengths, placed on the mesh."""
    rng = np.random.default_rng(seed)
    spec = train_setup.batch_spec(config)
    b, length = spec["tokens"].shape
    tokens = np.zeros((b, length), np.int32)
    for i in range(b):
        n = int(rng.integers(length // 4, length - 1))
        tokens[i, 0], tokens[i, n + 1] = 1, 2
        tokens[i, 1 : n + 1] = rng.integers(4, config.model.vocab_size, n)
    images = rng.normal(size=spec["image"].shape).astype(np.float32)
    return jax.device_put({"image": images, "tokens": tokens}, setup.placement.batch_sharding)


def peak_memory_gib() -> float | None:
    stats = [d.memory_stats() for d in jax.local_devices()]
    peaks = [s.get("peak_bytes_in_use") for s in stats if s]
    return max(peaks) / 2**30 if peaks and None not in peaks else None


def benchmark(config: Any, steps: int = 20, warmup: int = 3) -> dict[str, Any]:
    placement = sharding.Placement.from_config(config.mesh)
    setup = train_setup.make_setup(config, placement, num_train_examples=None)
    state = train_setup.initial_state(setup, config.seed)
    compiled, report = train_step.compile_train_step(setup)
    batch = synthetic_batch(config, setup)
    for _ in range(warmup):
        state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
    seconds = (time.perf_counter() - start) / steps
    flops_per_step = flops.train_flops_per_example(config.model) * config.batch_size
    tflops = flops_per_step / seconds / placement.num_devices / 1e12
    peak = hardware.peak_flops_per_device()
    return {
        "device": jax.devices()[0].device_kind,
        "num_devices": placement.num_devices,
        "batch_size": config.batch_size,
        "compile_seconds": report["compile_seconds"],
        "seconds_per_step": seconds,
        "examples_per_sec": config.batch_size / seconds,
        "examples_per_sec_per_device": config.batch_size / seconds / placement.num_devices,
        "tflops_per_sec_per_device": tflops,
        "mfu": None if peak is None else tflops * 1e12 / peak,
        "peak_memory_gib": peak_memory_gib(),
        "temp_gib": report.get("temp_gib"),
        "loss": float(metrics["loss"]),
    }


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    result = benchmark(binaries.config_from_flags(), flags.FLAGS.steps, flags.FLAGS.warmup)
    if flags.FLAGS.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:<30}{value}")


def define_flags() -> None:
    """Flags are defined here, not at import, so importing this module has no side effects."""
    config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
    flags.DEFINE_integer("steps", 20, "Timed steps.")
    flags.DEFINE_integer("warmup", 3, "Untimed steps after compiling.")
    flags.DEFINE_bool("json", False, "Print one JSON object.")


if __name__ == "__main__":
    define_flags()
    binaries.run_app(main)
