"""One transfer run: load the pretrained towers, run the task, save the head, write the results.

``<workdir>/transfer_results.json`` holds the task, the pretraining checkpoint (path, step, size,
objective), the numbers per evaluation split with their chance levels, the training summary and
the full config; ``metrics.jsonl`` the training curve; ``checkpoints/<step>`` the trained
parameters (tower and head, with the data position, written as pretraining writes them; or the
probe's weights and feature statistics). A SIGTERM during training saves and leaves without
results; the same command resumes from the workdir.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import ml_collections
from absl import logging

from sycoca_jax import workdir_lock
from sycoca_jax.transfer import finetune, linear_probe, results, towers, vqa

# Each returns its report, or None when a stop request (SIGTERM) ended training early.
TASKS: dict[str, Callable[..., dict[str, Any] | None]] = {
    "linear_probe": linear_probe.run,
    "finetune": finetune.run,
    "vqa": vqa.run,
}


def run(
    config: ml_collections.ConfigDict, workdir: str, force_unlock: bool = False
) -> dict[str, Any]:
    """Runs ``config.task`` from the checkpoint ``config.init``; returns what it wrote (nothing
    when a stop request ended it early). The workdir's lease is held throughout
    (``force_unlock``: taken from a live holder too)."""
    if config.task not in TASKS:
        raise ValueError(f"unknown transfer task {config.task!r}; known: {', '.join(TASKS)}")
    if not config.init:
        raise ValueError(
            "no pretraining checkpoint: pass --init=<pretraining workdir> (or set config.init)"
        )
    with workdir_lock.hold_for_run(workdir, force_unlock) as lease:
        return _run(config, workdir, lease)


def _run(
    config: ml_collections.ConfigDict, workdir: str, lease: workdir_lock.Held
) -> dict[str, Any]:
    start = time.perf_counter()
    pretrained = towers.load_pretrained(config.init, config.init_step, config.model.to_dict())
    logging.info("transfer %s from %s step %d", config.task, pretrained.path, pretrained.step)
    report = TASKS[config.task](config, workdir, pretrained, lease)
    if report is None:
        logging.warning("stopped before the end; run the same command to resume from %s", workdir)
        return {}
    out = {
        "task": config.task,
        "checkpoint": {
            "path": pretrained.path,
            "step": pretrained.step,
            "size": pretrained.config.get("size"),
            "objective": pretrained.config.get("objective"),
        },
        "dataset": config.data.name,
        **report,
        "seconds": time.perf_counter() - start,
        "config": config.to_dict(),
    }
    path = results.write_results(workdir, out)
    for split, numbers in report.get("splits", {}).items():
        shown = {k: v for k, v in numbers.items() if isinstance(v, float)}
        logging.info("%s %s: %s (chance %s)", config.task, split, shown, numbers.get("chance"))
    logging.info("wrote %s", path)
    return out
