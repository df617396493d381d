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

from sycoca_jax import checkpoint as ckpt
from sycoca_jax import sharding, workdir_lock
from sycoca_jax.data import pipeline, sources
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
    placement: sharding.Placement,
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


def split_features(
    config: ml_collections.ConfigDict, pretrained: towers.Pretrained
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Features and labels of the training, selection and evaluation splits."""
    data, model = config.data, pretrained.model
    placement = sharding.Placement.from_config(config.mesh)
    sharding.check_batch_size(config.eval_batch_size, placement.mesh)
    names = towers.probe_subtrees(model, config.linear_probe.feature)
    params = pretrained.tower_params(
        names, placement.shardings(towers.abstract_tower(model, names))
    )
    kind = config.linear_probe.feature

    def feature_fn(tower, batch):
        images = batch["image"]
        return {
            "features": model.apply({"params": tower}, images, kind, method=towers.probe_features)
        }

    splits = dict.fromkeys([data.train_split, data.select_split, *data.eval_splits])
    return {
        split: extract_features(placement, pretrained, params, config, split, feature_fn)
        for split in splits
    }


def run(
    config: ml_collections.ConfigDict,
    workdir: str,
    pretrained: towers.Pretrained,
    lease: workdir_lock.Held | None = None,
) -> dict[str, Any]:
    """Extracts features, fits the probes, reports, saves the kept probe (with
    ``save_checkpoint``); returns the results."""
    data, probe = config.data, config.linear_probe
    num_classes = len(sources.class_names(data.name, data.data_dir))
    features = split_features(config, pretrained)
    train_x, train_y = features[data.train_split]
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    grid = tuple(float(v) for v in probe.l2_grid)
    weights, biases = fit(
        (train_x - mean) / std,
        train_y,
        num_classes,
        grid,
        steps=probe.steps,
        lr=probe.lr,
        batch_size=probe.batch_size,
        seed=config.seed,
    )
    weights, biases = np.asarray(weights), np.asarray(biases)

    def logits(x, g):
        return ((x - mean) / std) @ weights[g] + biases[g]

    select_x, select_y = features[data.select_split]
    sweep = [results.topk_accuracy(logits(select_x, g), select_y)["top1"] for g in range(len(grid))]
    best = int(np.argmax(sweep))
    logging.info(
        "linear probe: %s top-1 per l2 %s; keeping l2=%g", data.select_split, sweep, grid[best]
    )
    probe_state = {"w": weights[best], "b": biases[best], "mean": mean, "std": std}
    report = _report(features, data, num_classes, lambda x: logits(x, best))
    results.write_metrics(workdir, 0, {f"{split}/top1": r["top1"] for split, r in report.items()})
    if config.save_checkpoint:
        if lease is not None:
            lease.check()  # never write into a workdir another run has taken
        save_probe(workdir, probe_state, config)
    summary = {
        "num_classes": num_classes,
        "feature": probe.feature,
        "feature_dim": int(train_x.shape[1]),
        "l2_grid": list(grid),
        f"{data.select_split}_top1_per_l2": sweep,
        "l2": grid[best],
    }
    return {**summary, "splits": report}


def _report(
    features: dict[str, tuple[np.ndarray, np.ndarray]],
    data: ml_collections.ConfigDict,
    num_classes: int,
    logits: Any,
) -> dict[str, dict[str, Any]]:
    """Accuracies of the kept probe on the training and evaluation splits, with chance."""
    train_counts = np.bincount(features[data.train_split][1], minlength=num_classes)
    report = {}
    for split in (data.train_split, *data.eval_splits):
        x, labels = features[split]
        report[split] = {
            **results.topk_accuracy(logits(x), labels),
            "examples": len(labels),
            "chance": results.classification_baselines(train_counts, labels),
        }
    return report


def save_probe(workdir: str, probe_state: dict[str, Any], config: ml_collections.ConfigDict):
    """The probe's weights and feature statistics as checkpoint step 0 (never overwritten)."""
    checkpointer = ckpt.Checkpointer(workdir, max_to_keep=None, async_save=False)
    try:
        if 0 in checkpointer.all_steps():
            logging.warning("%s already holds step 0: not overwriting it", workdir)
            return
        checkpointer.save(0, probe_state, config=config, force=True)
        checkpointer.wait()
    finally:
        checkpointer.close()
