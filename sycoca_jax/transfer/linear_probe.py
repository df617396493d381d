"""Linear probe: frozen features extracted once, a linear softmax classifier trained on them.

Features (``linear_probe.feature``): ``mean_patch``, the mean of the image encoder's patch
states; ``embedding``, the unit-norm contrastive image embedding; or both concatenated. Training
images are centre-cropped (no augmentation), as in CLIP's probes. Features are standardised with
the training split's statistics; the classifier (cross-entropy + ``l2``·|W|²) is trained with
Adam, full batch (or minibatches of ``linear_probe.batch_size``), for every ``l2`` of
``linear_probe.l2_grid`` at once (``vmap``, one compile). The ``l2`` with the best top-1 on
``data.select_split`` is kept and every ``data.eval_splits`` split is reported with it.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from sycoca_jax import sharding
from sycoca_jax.data import pipeline, sources
from sycoca_jax.metrics import MetricWriter
from sycoca_jax.transfer import inputs, results, towers, trainer


def fit(
    features: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    l2_grid: tuple[float, ...],
    *,
    steps: int = 1000,
    lr: float = 1e-2,
    batch_size: int = 0,
    seed: int = 0,
) -> tuple[jax.Array, jax.Array]:
    """Multinomial logistic regression for every ``l2`` in ``l2_grid``: weights (G, D, C) and
    biases (G, C). ``batch_size`` 0 (or >= the number of examples) trains full batch."""
    x = jnp.asarray(features, jnp.float32)
    y = jnp.asarray(labels, jnp.int32)
    n, d = x.shape
    full_batch = batch_size <= 0 or batch_size >= n
    tx = optax.adam(lr)

    def loss(params, l2, xb, yb):
        logits = xb @ params["w"] + params["b"]
        ce = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, yb))
        return ce + l2 * jnp.sum(params["w"] ** 2)

    def train_one(l2):
        params = {"w": jnp.zeros((d, num_classes)), "b": jnp.zeros((num_classes,))}

        def step(carry, i):
            params, opt_state = carry
            if full_batch:
                xb, yb = x, y
            else:
                key = jax.random.fold_in(jax.random.key(seed), i)
                rows = jax.random.randint(key, (batch_size,), 0, n)
                xb, yb = x[rows], y[rows]
            grads = jax.grad(loss)(params, l2, xb, yb)
            updates, opt_state = tx.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), None

        (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), jnp.arange(steps))
        return params["w"], params["b"]

    return jax.jit(jax.vmap(train_one))(jnp.asarray(l2_grid, jnp.float32))


def extract_features(
    placement: trainer.Placement,
    pretrained: towers.Pretrained,
    params: Any,
    config: ml_collections.ConfigDict,
    split: str,
    feature_fn: Any,
) -> tuple[np.ndarray, np.ndarray]:
    """(features (n, D), labels (n,)) of every image of ``split``, centre-cropped."""
    dataset = pipeline.eval_dataset(
        inputs.open_split(config, split),
        task="classification",
        spec=inputs.spec(config),
        image_size=pretrained.model.image_size,
        global_batch_size=config.eval_batch_size,
        min_image_size=config.data.min_image_size,
    )
    out = trainer.predict(
        placement, feature_fn, params, dataset, ["image"], ["label"], inputs.eval_threads(config)
    )
    return out["features"].astype(np.float32), out["label"]


def run(
    config: ml_collections.ConfigDict, workdir: str, pretrained: towers.Pretrained
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Extracts features, fits the probes, reports; returns the results and the probe."""
    data, probe = config.data, config.linear_probe
    model = pretrained.model
    mesh = sharding.make_mesh(config.mesh.shape)
    sharding.check_batch_size(config.eval_batch_size, mesh)
    placement = trainer.Placement(mesh, sharding.logical_rules(config.mesh.rules))
    names = towers.probe_subtrees(model, probe.feature)
    shardings = sharding.shardings_from_boxed(
        towers.abstract_tower(model, names), mesh, placement.rules
    )
    params = pretrained.tower_params(names, shardings)
    num_classes = len(sources.class_names(data.name, data.data_dir))

    kind = probe.feature

    def feature_fn(tower, batch):
        images = batch["image"]
        return {
            "features": model.apply({"params": tower}, images, kind, method=towers.probe_features)
        }

    splits = dict.fromkeys([data.train_split, data.select_split, *data.eval_splits])
    features = {
        split: extract_features(placement, pretrained, params, config, split, feature_fn)
        for split in splits
    }
    train_x, train_y = features[data.train_split]
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6

    def standardise(x):
        return (x - mean) / std

    grid = tuple(float(v) for v in probe.l2_grid)
    weights, biases = fit(
        standardise(train_x),
        train_y,
        num_classes,
        grid,
        steps=probe.steps,
        lr=probe.lr,
        batch_size=probe.batch_size,
        seed=config.seed,
    )
    weights, biases = np.asarray(weights), np.asarray(biases)

    def logits(split, g):
        return standardise(features[split][0]) @ weights[g] + biases[g]

    select = data.select_split
    labels = features[select][1]
    sweep = [results.topk_accuracy(logits(select, g), labels)["top1"] for g in range(len(grid))]
    best = int(np.argmax(sweep))
    logging.info("linear probe: %s top-1 per l2 %s; keeping l2=%g", select, sweep, grid[best])
    train_counts = np.bincount(train_y, minlength=num_classes)
    report = {}
    for split in (data.train_split, *data.eval_splits):
        labels = features[split][1]
        report[split] = {
            **results.topk_accuracy(logits(split, best), labels),
            "examples": len(labels),
            "chance": results.classification_baselines(train_counts, labels),
        }
    writer = MetricWriter(workdir)
    writer.write(0, {f"{split}/top1": r["top1"] for split, r in report.items()})
    writer.close()
    summary = {
        "num_classes": num_classes,
        "feature": probe.feature,
        "feature_dim": int(train_x.shape[1]),
        "l2_grid": list(grid),
        f"{select}_top1_per_l2": sweep,
        "l2": grid[best],
    }
    probe_state = {"w": weights[best], "b": biases[best], "mean": mean, "std": std}
    return {**summary, "splits": report}, probe_state
