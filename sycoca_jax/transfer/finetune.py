"""Fine-tuned classification (CoCa App. A): a new single-query attentional pooler over the image
encoder's patch states + a linear classifier, softmax cross-entropy with label smoothing.

The image tower trains with ``optim.tower_lr`` or, with ``optim.freeze_tower``, stays frozen
(CoCa's frozen-feature attentional-pooler evaluation). Training images are augmented as in
pretraining (random resized crop, ``data.crop_scale``); evaluation uses the centre crop.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from sycoca_jax import workdir_lock
from sycoca_jax.data import pipeline, sources, task_pipelines
from sycoca_jax.transfer import heads, inputs, results, towers, trainer


def classifier_task(
    pretrained: towers.Pretrained, num_classes: int, config: ml_collections.ConfigDict
) -> tuple[trainer.HeadTask, Any]:
    """The task (tower = the image encoder) and its ``logits(params, batch)`` function."""
    model = pretrained.model
    head = heads.PooledClassifier(
        num_classes,
        width=model.image_width,
        num_heads=config.head.num_heads or model.pooler_heads,
        dtype=model.dtype,
    )
    head_inputs = (jax.ShapeDtypeStruct((1, model.num_patches, model.image_width), jnp.float32),)
    smoothing = config.head.label_smoothing

    def logits_fn(params, batch):
        tower = {"params": params["tower"]}
        states = model.apply(tower, batch["image"], method=towers.patch_states)
        return head.apply({"params": params["head"]}, states)

    def loss_fn(params, batch):
        logits = logits_fn(params, batch)
        targets = optax.smooth_labels(jax.nn.one_hot(batch["label"], num_classes), smoothing)
        loss = jnp.mean(optax.softmax_cross_entropy(logits, targets))
        accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
        return loss, {"loss": loss, "accuracy": accuracy}

    task = trainer.HeadTask(model, towers.subtrees("image_encoder"), head, head_inputs, loss_fn)
    return task, lambda params, batch: {"logits": logits_fn(params, batch)}


def run(
    config: ml_collections.ConfigDict,
    workdir: str,
    pretrained: towers.Pretrained,
    lease: workdir_lock.Held | None = None,
) -> dict[str, Any] | None:
    """Trains the classifier (resuming from ``workdir``); returns the results per evaluation
    split, or None when a stop request (SIGTERM) ended training early."""
    data = config.data
    num_classes = len(sources.class_names(data.name, data.data_dir))
    train_source = inputs.open_split(config, data.train_split)
    task, predict_fn = classifier_task(pretrained, num_classes, config)
    setup = trainer.make_setup(config, task, len(train_source))
    dataset = task_pipelines.classification_train_dataset(
        train_source,
        spec=inputs.spec(config),
        image_size=pretrained.model.image_size,
        global_batch_size=config.batch_size,
        **inputs.loader_options(config),
    )
    batches = inputs.train_iterator(dataset, config)
    outcome = trainer.train_head(setup, workdir, batches, pretrained, lease)
    if outcome.stopped:
        return None
    train_counts = task_pipelines.label_counts(train_source, inputs.spec(config), num_classes)
    splits = {
        split: evaluate_split(setup, predict_fn, outcome.state["params"], split, train_counts)
        for split in data.eval_splits
    }
    top1 = {f"{split}/top1": numbers["top1"] for split, numbers in splits.items()}
    results.write_metrics(workdir, setup.total_steps, top1)
    summary = {"num_classes": num_classes, "steps": setup.total_steps, "train": outcome.metrics}
    return {**summary, "splits": splits}


def evaluate_split(
    setup: trainer.HeadSetup,
    predict_fn: Any,
    params: Any,
    split: str,
    train_counts: np.ndarray,
) -> dict[str, Any]:
    """Top-1/top-5 on ``split`` (centre crops) with its chance levels."""
    config = setup.config
    eval_data = pipeline.eval_dataset(
        inputs.open_split(config, split),
        task="classification",
        spec=inputs.spec(config),
        image_size=setup.task.model.image_size,
        global_batch_size=config.eval_batch_size,
        min_image_size=config.data.min_image_size,
    )
    out = trainer.predict(
        setup.placement,
        predict_fn,
        params,
        eval_data,
        ["image"],
        ["label"],
        inputs.eval_threads(config),
    )
    return {
        **results.topk_accuracy(out["logits"], out["label"]),
        "examples": len(out["label"]),
        "chance": results.classification_baselines(train_counts, out["label"]),
    }
