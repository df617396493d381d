"""Throughput of the full training input pipeline (read, decode, augment, tokenise, batch).

  python -m sycoca_jax.data.benchmark --config=configs/sycoca.py:tiny \\
      --config.data.num_workers=2 --num_batches=200 --step_rate=1829,4500

Prints examples/s on this host for the configured number of workers and prefetch kind, so a
run can be checked to never wait on its input: compare with the trainer's examples/s per host.
It also counts the CPU time the pipeline used (this process and its worker processes) over the
timed batches: examples per CPU second is the rate one core sustains, and it stays meaningful on
a host busy with other work, where examples/s alone only gives a lower bound. ``--step_rate``
turns it into the cores a host needs to feed a step that consumes that many examples/s with
``--headroom`` (2x) to spare.
"""

from __future__ import annotations

import json
import math
import time

import ml_collections
import psutil

from sycoca_jax.data import pipeline


def cpu_seconds(process: psutil.Process) -> float:
    """User + system CPU seconds of ``process`` and its live descendants (worker processes)."""
    total = 0.0
    for proc in [process, *process.children(recursive=True)]:
        try:
            times = proc.cpu_times()
        except psutil.NoSuchProcess:  # a worker that ended meanwhile
            continue
        total += times.user + times.system
    return total


def cores_needed(step_rate: float, examples_per_cpu_s: float, headroom: float = 2.0) -> int:
    """Cores whose CPU time yields ``headroom`` times ``step_rate`` examples/s."""
    return math.ceil(headroom * step_rate / examples_per_cpu_s)


def measure(
    config: ml_collections.ConfigDict, *, num_batches: int = 100, warmup_batches: int = 5
) -> dict[str, float]:
    """Examples/s of ``make_train_iterator(config)`` over ``num_batches`` after a warm-up
    (worker start-up and first reads are not counted), and the CPU time spent on them."""
    process = psutil.Process()
    iterator = pipeline.make_train_iterator(config)
    try:
        for _ in range(warmup_batches):
            next(iterator)
        cpu_start = cpu_seconds(process)
        start = time.perf_counter()
        examples = 0
        for _ in range(num_batches):
            batch = next(iterator)
            examples += len(batch["tokens"])
        elapsed = time.perf_counter() - start
        cpu = cpu_seconds(process) - cpu_start
    finally:
        iterator.close()
    workers = int(config.data.num_workers)
    return {
        "examples_per_s": examples / elapsed,
        "examples_per_s_per_worker": examples / elapsed / max(workers, 1),
        "examples_per_cpu_s": examples / cpu if cpu > 0 else math.inf,
        "cpu_cores_busy": cpu / elapsed,
        "batches_per_s": num_batches / elapsed,
        "host_batch_size": float(examples / num_batches),
        "num_workers": float(workers),
        "skipped_records": float(iterator.stats.total_skipped),
    }


def _main(argv) -> None:
    from absl import flags

    del argv
    config = flags.FLAGS.config
    result = measure(
        config, num_batches=flags.FLAGS.num_batches, warmup_batches=flags.FLAGS.warmup_batches
    )
    prefetch = config.data.prefetch if config.data.num_workers else "inline"
    print(
        f"{config.data.name}[{config.data.train_split}] {config.model.image_size}px: "
        f"{result['examples_per_s']:.1f} examples/s "
        f"({result['batches_per_s']:.2f} batches/s of {int(result['host_batch_size'])}; "
        f"num_workers={config.data.num_workers}, prefetch={prefetch}, "
        f"skipped={int(result['skipped_records'])}); "
        f"{result['examples_per_cpu_s']:.1f} examples per CPU second "
        f"({result['cpu_cores_busy']:.2f} cores busy)"
    )
    headroom = flags.FLAGS.headroom
    for rate in flags.FLAGS.step_rate:
        cores = cores_needed(float(rate), result["examples_per_cpu_s"], headroom)
        result[f"cores_for_{headroom:g}x_{rate}"] = float(cores)
        print(f"  a step at {rate} examples/s needs {cores} cores for {headroom:g}x its rate")
    print(json.dumps({"name": config.data.name, "prefetch": prefetch, **result}))


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file(
        "config", None, "config file, e.g. configs/sycoca.py:tiny", lock_config=True
    )
    flags.DEFINE_integer("num_batches", 100, "batches timed")
    flags.DEFINE_integer("warmup_batches", 5, "batches read before timing starts")
    flags.DEFINE_list("step_rate", [], "examples/s a train step consumes per host, e.g. 1829,4500")
    flags.DEFINE_float("headroom", 2.0, "input rate wanted, as a multiple of the step rate")
    flags.mark_flags_as_required(["config"])
    app.run(_main)
