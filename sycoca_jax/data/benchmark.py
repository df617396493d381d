"""Throughput of the full training input pipeline (read, decode, augment, tokenise, batch).

  python -m sycoca_jax.data.benchmark --config=configs/sycoca.py:tiny \\
      --config.data.num_workers=2 --num_batches=200

Prints examples/s on this host for the configured number of workers and prefetch kind, so a
run can be checked to never wait on its input: compare with the trainer's examples/s per host.
"""

from __future__ import annotations

import time

import ml_collections

from sycoca_jax.data import pipeline


def measure(
    config: ml_collections.ConfigDict, *, num_batches: int = 100, warmup_batches: int = 5
) -> dict[str, float]:
    """Examples/s of ``make_train_iterator(config)`` over ``num_batches`` after a warm-up
    (worker start-up and first reads are not counted)."""
    iterator = pipeline.make_train_iterator(config)
    try:
        for _ in range(warmup_batches):
            next(iterator)
        start = time.perf_counter()
        examples = 0
        for _ in range(num_batches):
            batch = next(iterator)
            examples += len(batch["tokens"])
        elapsed = time.perf_counter() - start
    finally:
        iterator.close()
    return {
        "examples_per_s": examples / elapsed,
        "batches_per_s": num_batches / elapsed,
        "host_batch_size": float(examples / num_batches),
        "num_workers": float(config.data.num_workers),
        "skipped_records": float(iterator.stats.total_skipped),
    }


def _main(argv) -> None:
    from absl import flags

    del argv
    config = flags.FLAGS.config
    result = measure(
        config, num_batches=flags.FLAGS.num_batches, warmup_batches=flags.FLAGS.warmup_batches
    )
    print(
        f"{config.data.name}[{config.data.train_split}] {config.model.image_size}px: "
        f"{result['examples_per_s']:.1f} examples/s "
        f"({result['batches_per_s']:.2f} batches/s of {int(result['host_batch_size'])}; "
        f"num_workers={config.data.num_workers}, prefetch={config.data.prefetch}, "
        f"skipped={int(result['skipped_records'])})"
    )


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file(
        "config", None, "config file, e.g. configs/sycoca.py:tiny", lock_config=True
    )
    flags.DEFINE_integer("num_batches", 100, "batches timed")
    flags.DEFINE_integer("warmup_batches", 5, "batches read before timing starts")
    flags.mark_flags_as_required(["config"])
    app.run(_main)
