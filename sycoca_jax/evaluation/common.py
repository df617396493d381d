"""What every evaluator shares: the model to evaluate, its batches, gathering results, and the
split's subsets.

An evaluator is ``run(context: EvalContext, settings) -> dict[str, value]`` with ``settings`` its
frozen ``Settings`` dataclass (``sycoca_jax.evaluation.settings``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from sycoca_jax import sharding
from sycoca_jax.evaluation import predict
from sycoca_jax.evaluation.settings import EvalSettings
from sycoca_jax.models.sycoca import SyCoCa

# Boolean record features that split a test set in two, each with the name of the rest: the
# embedded dataset's test split marks scenes whose main shape is a colour/kind pair never seen in
# training. Metrics are reported on both parts (``compositional/top1``, ``seen/top1``) whenever the
# evaluated records have the feature.
SUBSETS = {"compositional": "seen"}


@dataclasses.dataclass(frozen=True)
class EvalContext:
    """A model's predict functions with its parameters, where they run, and the run's config
    (its ``data`` and ``model`` sections say how to read and tokenise the evaluation data)."""

    predictors: predict.Predictors
    params: Any
    config: ml_collections.ConfigDict
    placement: sharding.Placement

    @classmethod
    def for_model(
        cls,
        model: SyCoCa,
        params: Any,
        config: ml_collections.ConfigDict,
        placement: sharding.Placement,
    ) -> EvalContext:
        """A ``SyCoCa``'s context; building it again for the same model reuses the compiled
        predict functions (``predict.for_model``)."""
        return cls(predict.for_model(model), params, config, placement)


def batches(
    context: EvalContext, settings: EvalSettings, task: str
) -> Iterator[dict[str, np.ndarray]]:
    """Host batches of ``settings.dataset``/``split`` for ``task`` (every process gets the same
    number; padding rows have ``mask`` False), with the ``SUBSETS`` flags the records have."""
    from sycoca_jax.data import pipeline  # where used: configs import the evaluators

    yield from pipeline.make_eval_dataset(
        context.config,
        task,
        name=settings.dataset,
        split=settings.split,
        batch_size=settings.batch_size,
        subsets=tuple(SUBSETS),
    )


def to_device(
    host_batch: dict[str, np.ndarray], placement: sharding.Placement, keys: Sequence[str]
) -> dict[str, jax.Array]:
    """The named entries as global arrays, split over the batch axes."""
    from sycoca_jax.data import pipeline

    return pipeline.make_global_batch({k: host_batch[k] for k in keys}, placement)


def from_host_array(x: np.ndarray, placement: sharding.Placement) -> jax.Array:
    """A global array split over the batch axes from an array that every process holds whole
    (e.g. prompt tokens), each device taking its own rows."""
    return jax.make_array_from_callback(x.shape, placement.batch_sharding, lambda index: x[index])


def gather(x: jax.Array) -> np.ndarray:
    """The whole global array on every host, as numpy."""
    if jax.process_count() == 1:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def subset_rows(flags: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``{subset name: boolean rows}`` for each ``SUBSETS`` flag in ``flags`` and its rest;
    empty parts are left out."""
    out = {}
    for flag, rest in SUBSETS.items():
        if flag not in flags:
            continue
        rows = np.asarray(flags[flag], bool)
        for name, part in ((flag, rows), (rest, ~rows)):
            if part.any():
                out[name] = part
    return out


def prefixed(name: str, metrics: dict[str, Any]) -> dict[str, Any]:
    """``{f"{name}/{key}": value}``."""
    return {f"{name}/{key}": value for key, value in metrics.items()}
