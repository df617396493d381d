"""The evaluators by kind, and choosing and running ``config.evals`` entries.

Each entry of ``config.evals`` is ``kind`` plus the fields of that kind's ``Settings`` dataclass
(``configs/sycoca.py`` builds entries with ``entry_config``, so every field is present and can be
set with ``--config.evals.<entry>.<key>=...``); an unknown key is an error naming the valid ones.
``dataset`` unset means the training data's dataset. Results are ``{entry name: {metric:
value}}``; ``write_results`` stores them in ``<workdir>/eval_results.json`` with the step.

An entry the model cannot run (its evaluator needs a predict function the model lacks, e.g.
captioning on a CLIP model) is dropped with one log line by ``resolve``, or, when the entry is
``required`` (``python -m sycoca_jax.evaluate --evals=...`` makes the named entries required), is
an error before any training or evaluation.

Adding an evaluator, in its own module ``sycoca_jax/evaluation/<kind>.py``:

1. ``Settings``: a frozen dataclass subclassing ``settings.EvalSettings`` with the evaluator's own
   fields and their defaults; check values in ``__post_init__`` (call ``super().__post_init__()``).
2. ``NEEDS``: the ``predict.Predictors`` functions it calls (add a new one to ``Predictors`` and
   ``predict.for_model`` if none fits).
3. ``run(context: common.EvalContext, settings: Settings) -> dict[str, value]``: batches from
   ``common.batches``, the model only through ``context.predictors``, under
   ``context.placement.context()``; metric values are numbers or strings (other values go to
   ``eval_results.json`` but not to ``metrics.jsonl``).
4. One line in ``EVALUATORS`` below, and entries using it in ``configs/sycoca.py``
   (``evals_config``).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import ml_collections
from absl import logging

from sycoca_jax.evaluation import (
    captioning,
    common,
    mechanism,
    predict,
    retrieval,
    settings,
    zeroshot,
)
from sycoca_jax.evaluation.results import check_writable, write_results  # noqa: F401
from sycoca_jax.models import build


class Evaluator(NamedTuple):
    settings: type[settings.EvalSettings]
    run: Callable[[common.EvalContext, Any], dict[str, Any]]
    needs: tuple[str, ...]  # names of predict.Predictors functions


EVALUATORS = {
    "zeroshot": Evaluator(zeroshot.Settings, zeroshot.run, zeroshot.NEEDS),
    "retrieval": Evaluator(retrieval.Settings, retrieval.run, retrieval.NEEDS),
    "captioning": Evaluator(captioning.Settings, captioning.run, captioning.NEEDS),
    "mechanism": Evaluator(mechanism.Settings, mechanism.run, mechanism.NEEDS),
}


def entry_config(kind: str, **fields: Any) -> ml_collections.ConfigDict:
    """A ``config.evals`` entry of ``kind``: every field of its settings, defaults overridden by
    ``fields`` (an unknown field is an error)."""
    if kind not in EVALUATORS:
        raise ValueError(f"unknown evaluation kind {kind!r}; known kinds: {sorted(EVALUATORS)}")
    return settings.config_entry(kind, EVALUATORS[kind].settings, **fields)


def _settings(config: ml_collections.ConfigDict, name: str) -> settings.EvalSettings:
    """The entry ``name`` as its kind's settings, ``dataset`` filled in."""
    entry = config.evals[name]
    kind = entry.get("kind")
    if kind not in EVALUATORS:
        raise ValueError(f"config.evals.{name}.kind={kind!r}; known kinds: {sorted(EVALUATORS)}")
    parsed = settings.from_entry(EVALUATORS[kind].settings, entry, f"config.evals.{name}")
    if not parsed.dataset:
        try:  # the settings check the dataset too (e.g. mechanism needs sycoca_shapes)
            parsed = dataclasses.replace(parsed, dataset=config.data.name)
        except ValueError as e:
            raise ValueError(f"config.evals.{name}: {e}") from e
    return parsed


def config_predictors(config: ml_collections.ConfigDict) -> predict.Predictors:
    """The predict functions of ``config.model`` (nothing is compiled or allocated)."""
    return predict.for_model(build.from_config(config.model))


def missing(kind: str, predictors: predict.Predictors) -> list[str]:
    """The predict functions an evaluator of ``kind`` needs and ``predictors`` lack."""
    return [need for need in EVALUATORS[kind].needs if need not in predictors.available()]


def _why(config: ml_collections.ConfigDict, name: str, lacking: list[str]) -> str:
    return (
        f"config.evals.{name} ({config.evals[name].kind}) needs the predict function(s) "
        f"{lacking}, which this model (objective={config.get('objective', '?')}) lacks"
    )


def resolve(
    config: ml_collections.ConfigDict,
    name: str,
    predictors: predict.Predictors | None = None,
    required: bool | None = None,
) -> settings.EvalSettings | None:
    """The entry ``name``'s settings, checked before any work: None (with one log line) when the
    model cannot run it, or an error when it is ``required`` (the entry's field, unless given).
    ``predictors`` default to those of ``config.model``."""
    parsed = _settings(config, name)
    predictors = config_predictors(config) if predictors is None else predictors
    lacking = missing(config.evals[name].kind, predictors)
    if not lacking:
        return parsed
    if parsed.required if required is None else required:
        raise ValueError(f"{_why(config, name, lacking)}; drop it from --evals or config.evals")
    logging.info("eval %s dropped: %s", name, _why(config, name, lacking))
    return None


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
    """Entries to run during training at ``step`` (each every ``every_steps``, and at the end),
    leaving out those the model cannot run (``resolve`` announced them before training)."""
    names = []
    for name in config.evals.keys():
        every = config.evals[name].every_steps
        if every and (step % every == 0 or last_step):
            names.append(name)
    if not names:
        return names
    predictors = config_predictors(config)
    return [n for n in names if not missing(config.evals[n].kind, predictors)]


def run(context: common.EvalContext, names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Each entry's results; entries the model cannot run are left out (``resolve`` said so
    once), or fail if they are ``required``."""
    results = {}
    for name in names:
        parsed = _settings(context.config, name)
        lacking = missing(context.config.evals[name].kind, context.predictors)
        if lacking:
            if parsed.required:
                raise ValueError(_why(context.config, name, lacking))
            continue
        start = time.perf_counter()
        results[name] = EVALUATORS[context.config.evals[name].kind].run(context, parsed)
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
