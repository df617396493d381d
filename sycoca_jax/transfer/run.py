"""One transfer run: load the pretrained towers, run the task, save the head, write the results.

``<workdir>/transfer_results.json`` holds the task, the pretraining checkpoint (path, step, size,
objective), the numbers per evaluation split with their chance levels, the training summary and
the full config; ``metrics.jsonl`` the training curve; ``checkpoints/<step>`` the trained
parameters (tower and head, or the probe's weights and feature statistics).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import ml_collections
from absl import logging

from sycoca_jax import checkpoint as ckpt
from sycoca_jax.transfer import finetune, linear_probe, results, towers, vqa

TASKS: dict[str, Callable[..., tuple[dict[str, Any], Any]]] = {
    "linear_probe": linear_probe.run,
    "finetune": finetune.run,
    "vqa": vqa.run,
}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Runs ``config.task`` from the checkpoint ``config.init``; returns what it wrote."""
    if config.task not in TASKS:
        raise ValueError(f"unknown transfer task {config.task!r}; known: {', '.join(TASKS)}")
    if not config.init:
        raise ValueError(
            "no pretraining checkpoint: pass --init=<pretraining workdir> (or set config.init)"
        )
    start = time.perf_counter()
    pretrained = towers.load_pretrained(config.init, config.init_step, config.model.to_dict())
    logging.info("transfer %s from %s step %d", config.task, pretrained.path, pretrained.step)
    report, state = TASKS[config.task](config, workdir, pretrained)
    if config.save_checkpoint:
        _save(workdir, state, config)
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


def _save(workdir: str, state: Any, config: ml_collections.ConfigDict) -> None:
    step = int(state["step"]) if "step" in state else 0
    checkpointer = ckpt.Checkpointer(workdir, max_to_keep=None, async_save=False)
    try:
        if step in checkpointer.all_steps():
            logging.warning("%s already holds step %d: not overwriting it", workdir, step)
            return
        checkpointer.save(step, state, config=config, force=True)
        checkpointer.wait()
    finally:
        checkpointer.close()
