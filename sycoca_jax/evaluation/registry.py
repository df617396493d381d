"""The evaluators by kind, and running a selection of ``config.evals`` entries.

Each entry of ``config.evals`` is ``{kind, dataset, split, batch_size, every_steps, ...}``;
``dataset`` unset means the training data's dataset. Results are ``{entry name: {metric:
value}}``; ``write_results`` stores them as ``<workdir>/eval_results.json`` with the step.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
from absl import logging
from etils import epath

from sycoca_jax.evaluation import captioning, common, mechanism, retrieval, zeroshot

EVALUATORS = {
    "zeroshot": zeroshot,
    "retrieval": retrieval,
    "captioning": captioning,
    "mechanism": mechanism,
}


def resolve(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
    """The entry ``name`` of ``config.evals`` with its dataset filled in and its kind checked."""
    entry = config.evals[name].copy_and_resolve_references()
    if entry.kind not in EVALUATORS:
        raise ValueError(
            f"config.evals.{name}.kind={entry.kind!r}; known kinds: {sorted(EVALUATORS)}"
        )
    if not entry.get("dataset"):
        entry.dataset = config.data.name
    check = getattr(EVALUATORS[entry.kind], "check", None)
    if check is not None:
        check(entry)
    return entry


def select(config: ml_collections.ConfigDict, requested: Sequence[str] | None = None) -> list[str]:
    """Entry names to run: all of ``config.evals``, or those named or of the kinds named."""
    names = list(config.evals.keys())
    if not requested:
        return names
    chosen = [n for n in names if n in requested or config.evals[n].kind in requested]
    unknown = [r for r in requested if r not in names and r not in EVALUATORS]
    if unknown or not chosen:
        raise ValueError(
            f"--evals={','.join(requested)}: unknown {unknown or requested}; config.evals has "
            f"{names} (kinds {sorted(EVALUATORS)})"
        )
    return chosen


def due(config: ml_collections.ConfigDict, step: int, last_step: bool) -> list[str]:
    """Entries to run during training at ``step`` (each every ``every_steps``, and at the end)."""
    names = []
    for name in config.evals.keys():
        every = config.evals[name].every_steps
        if every and (step % every == 0 or last_step):
            names.append(name)
    return names


def run(context: common.EvalContext, names: Sequence[str]) -> dict[str, dict[str, Any]]:
    results = {}
    for name in names:
        entry = resolve(context.config, name)
        start = time.perf_counter()
        results[name] = EVALUATORS[entry.kind].run(context, entry)
        logging.info("eval %s (%.1f s): %s", name, time.perf_counter() - start, results[name])
    return results


def flatten(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """``{"eval/<name>/<metric>": value}`` for the metrics writer (numbers and strings only)."""
    return {
        f"eval/{name}/{key}": value
        for name, metrics in results.items()
        for key, value in metrics.items()
        if isinstance(value, (int, float, str))
    }


def write_results(workdir: str, step: int, results: dict[str, dict[str, Any]]) -> None:
    """``<workdir>/eval_results.json``: each entry's latest results and the step (process 0)."""
    if jax.process_index() != 0:
        return
    path = epath.Path(workdir) / "eval_results.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(path.read_text()) if path.exists() else {}
    previous.update({name: {**metrics, "step": int(step)} for name, metrics in results.items()})
    previous["step"] = int(step)
    path.write_text(json.dumps(previous, indent=2, default=str) + "\n")
