"""What every evaluator shares: its batches, running the model on the mesh, gathering results.

An evaluator is a module with ``run(context: EvalContext, eval_config) -> dict[str, float]``;
``eval_config`` is one entry of ``config.evals`` (``kind``, ``dataset``, ``split``,
``batch_size`` and the evaluator's own fields).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from sycoca_jax import sharding
from sycoca_jax.data import pipeline
from sycoca_jax.models.sycoca import SyCoCa


@dataclasses.dataclass(frozen=True)
class EvalContext:
    """A model with its parameters, placed on a mesh, and the run's config."""

    model: SyCoCa
    params: Any
    config: ml_collections.ConfigDict
    mesh: Mesh
    rules: sharding.Rules

    def call(self, jitted: Callable[..., Any], *args: Any) -> Any:
        """``jitted(model, params, *args)`` traced under the mesh and logical rules.

        Evaluators define ``jitted`` once at module level with the model (hashable by value)
        as a static argument, so evaluating again during training reuses the compilation.
        """
        with sharding.model_context(self.mesh, self.rules):
            return jitted(self.model, self.params, *args)


def batches(
    context: EvalContext, eval_config: ml_collections.ConfigDict, task: str
) -> Iterator[dict[str, np.ndarray]]:
    """Host batches of ``eval_config.dataset``/``split`` for ``task`` (every process gets the
    same number; padding rows have ``mask`` False)."""
    dataset = pipeline.make_eval_dataset(
        context.config,
        task,
        name=eval_config.dataset,
        split=eval_config.split,
        batch_size=eval_config.batch_size,
    )
    yield from dataset


def to_device(
    host_batch: dict[str, np.ndarray], mesh: Mesh, keys: Sequence[str]
) -> dict[str, jax.Array]:
    """The named entries as global arrays, split over the batch axes."""
    return pipeline.make_global_batch({k: host_batch[k] for k in keys}, mesh)


def from_host_array(x: np.ndarray, mesh: Mesh) -> jax.Array:
    """A global array split over the batch axes from an array that every process holds whole
    (e.g. prompt tokens), each device taking its own rows."""
    return jax.make_array_from_callback(
        x.shape, sharding.batch_sharding(mesh), lambda index: x[index]
    )


def gather(x: jax.Array) -> np.ndarray:
    """The whole global array on every host, as numpy."""
    if jax.process_count() == 1:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
