"""Masking pictures in TensorBoard at evaluation steps.

At every step where an entry of ``config.evals`` runs, the first ``config.tensorboard_pictures``
images of the evaluation split are drawn as ``tools.visualize`` draws them -- the image, the
relevance heat map, the patches the captioner keeps, the patches TG-MIM hides and TG-MIM's
reconstruction -- and written as the TensorBoard image ``pictures/masking`` (one row per image),
so how the selection evolves can be watched during training. ``0`` turns it off.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from sycoca_jax import sharding
from sycoca_jax.metrics import MetricWriter
from sycoca_jax.train.setup import TrainSetup

TAG = "pictures/masking"


def picture_writer(setup: TrainSetup, writer: MetricWriter) -> Callable[[int, Any], None] | None:
    """``write(step, params)``, or None when ``config.tensorboard_pictures`` is 0."""
    count = setup.config.tensorboard_pictures
    if not count:
        return None
    # Imported where used: drawing needs PIL, the evaluation split needs the data stack.
    from sycoca_jax.data import pipeline
    from sycoca_jax.tools import pictures as drawing
    from sycoca_jax.tools import visualize

    model, placement = setup.model, setup.placement
    shards = sharding.batch_shards(placement.mesh)
    batch_size = -(-count // shards) * shards
    views_fn = jax.jit(functools.partial(visualize.masking_views, model))
    host: dict[str, np.ndarray] = {}

    def write(step: int, params: Any) -> None:
        if not host:  # the same images every time
            first = pipeline.make_eval_dataset(setup.config, "validation", batch_size=batch_size)[0]
            host.update(image=first["image"], tokens=first["tokens"])
        batch = pipeline.make_global_batch(dict(host), placement)
        with placement.context():
            views = views_fn(params, batch["image"], batch["tokens"], jax.random.key(step))
        views, images = multihost_utils.process_allgather((views, batch["image"]), tiled=True)
        rows = drawing.panel_rows(
            np.asarray(images)[:count],
            views["relevance"][:count],
            views["kept"][:count],
            views["hidden"][:count],
            views["prediction"][:count] if "prediction" in views else None,
            model.patch_size,
            scale=1,
            normalised_targets=model.norm_pix_loss,
        )
        writer.write_image(step, TAG, np.concatenate(list(rows), axis=0))  # one row per image

    return write
