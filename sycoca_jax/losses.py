"""The three SyCoCa objectives and their weighted sum (DESIGN §2), all in float32.

``total_loss`` reads the model's training outputs; a term whose weight is 0 or whose outputs are
absent (CoCa has no TG-MIM, CLIP no captioning) is skipped and not logged.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array


def itc_loss(
    image_embedding: Array, text_embedding: Array, temperature: Array
) -> tuple[Array, Array]:
    """Symmetric InfoNCE over the whole (global) batch; returns (loss, image→text accuracy).

    Embeddings are unit norm; under ``jit`` with a sharded batch XLA gathers them, so every
    example sees every other example of the global batch as a negative.
    """
    logits = temperature * jnp.einsum(
        "ie,te->it", image_embedding.astype(jnp.float32), text_embedding.astype(jnp.float32)
    )
    labels = jnp.arange(logits.shape[0])
    image_to_text = -jnp.mean(
        jnp.take_along_axis(jax.nn.log_softmax(logits, axis=1), labels[:, None], 1)
    )
    text_to_image = -jnp.mean(
        jnp.take_along_axis(jax.nn.log_softmax(logits, axis=0), labels[None, :], 0)
    )
    accuracy = jnp.mean(jnp.argmax(logits, axis=1) == labels)
    return 0.5 * (image_to_text + text_to_image), accuracy


def caption_loss(
    logits: Array, targets: Array, weights: Array, label_smoothing: float = 0.0
) -> tuple[Array, Array]:
    """Token-level cross-entropy averaged over non-pad targets; returns (loss, token accuracy).

    ``targets`` come from ``caption_input_and_target`` (the one shift); ``weights`` are 0 at pads.
    Label smoothing mixes in the uniform distribution: (1-ε)·NLL + ε·mean over the vocabulary.
    """
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    if label_smoothing:
        nll = (1.0 - label_smoothing) * nll - label_smoothing * jnp.mean(log_probs, axis=-1)
    total = jnp.maximum(jnp.sum(weights), 1.0)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return jnp.sum(nll * weights) / total, jnp.sum(correct * weights) / total


def tgmim_loss(prediction: Array, target: Array, mask: Array) -> Array:
    """Mean squared pixel error per patch, averaged over the masked patches only (MAE)."""
    per_patch = jnp.mean(jnp.square(prediction.astype(jnp.float32) - target), axis=-1)
    mask = mask.astype(jnp.float32)
    return jnp.sum(per_patch * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def total_loss(outputs: Mapping[str, Array], loss_config: Any) -> tuple[Array, dict[str, Array]]:
    """``itc_weight·ITC + caption_weight·IC + tgmim_weight·TG-MIM`` and per-term metrics."""
    metrics: dict[str, Array] = {}
    total = jnp.zeros((), jnp.float32)
    if loss_config.itc_weight:
        itc, accuracy = itc_loss(
            outputs["image_embedding"], outputs["text_embedding"], outputs["temperature"]
        )
        total += loss_config.itc_weight * itc
        metrics["loss/itc"] = itc
        metrics["accuracy/itc"] = accuracy
    if loss_config.caption_weight and "caption_logits" in outputs:
        ic, accuracy = caption_loss(
            outputs["caption_logits"],
            outputs["caption_targets"],
            outputs["caption_weights"],
            loss_config.label_smoothing,
        )
        total += loss_config.caption_weight * ic
        metrics["loss/caption"] = ic
        metrics["accuracy/caption"] = accuracy
    if loss_config.tgmim_weight and "tgmim_prediction" in outputs:
        mim = tgmim_loss(
            outputs["tgmim_prediction"], outputs["tgmim_target"], outputs["tgmim_mask"]
        )
        total += loss_config.tgmim_weight * mim
        metrics["loss/tgmim"] = mim
    metrics["loss"] = total
    metrics["temperature"] = outputs["temperature"]
    return total, metrics


def check_loss_config(loss_config: Any, model_config: Any) -> None:
    """Weights that ask for a head the model does not build are a config error, not a 0 loss."""
    if loss_config.caption_weight and not model_config.use_captioning:
        raise ValueError("loss.caption_weight > 0 but model.use_captioning is False")
    if loss_config.tgmim_weight and not model_config.use_tgmim:
        raise ValueError("loss.tgmim_weight > 0 but model.use_tgmim is False")
    if not (loss_config.itc_weight or loss_config.caption_weight or loss_config.tgmim_weight):
        raise ValueError("every loss weight is 0: nothing to train")
