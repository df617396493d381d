"""The three SyCoCa objectives and their weighted sum, all in float32.

``total_loss`` reads the model's training outputs; a term whose weight is 0 or whose outputs are
absent (CoCa has no TG-MIM, CLIP no captioning) is skipped and not logged.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array

# Sequence positions per chunk of the captioning cross-entropy: at batch 256 and a 64k
# vocabulary, 8 positions are 0.5 GB of float32 at a time instead of 5 GB for all 76.
DEFAULT_CHUNK_LEN = 8


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
    logits: Array,
    targets: Array,
    weights: Array,
    label_smoothing: float = 0.0,
    chunk_len: int = DEFAULT_CHUNK_LEN,
) -> tuple[Array, Array]:
    """Token-level cross-entropy averaged over non-pad targets; returns (loss, token accuracy).

    ``targets`` come from ``caption_input_and_target`` (the one shift); ``weights`` are 0 at pads.
    Label smoothing mixes in the uniform distribution: (1-ε)·NLL + ε·mean over the vocabulary.
    ``logits`` stay in their compute dtype (bfloat16 in the large configs): the loss is computed
    ``chunk_len`` positions at a time in float32 (``token_cross_entropy``), so no float32 copy of
    the batch × length × vocabulary logits, nor of their gradient, is ever made.
    """
    nll, correct = token_cross_entropy(logits, targets, label_smoothing, chunk_len)
    total = jnp.maximum(jnp.sum(weights), 1.0)
    return jnp.sum(nll * weights) / total, jnp.sum(correct * weights) / total


def _chunk_starts(length: int, chunk_len: int) -> tuple[int, int, int]:
    """(chunk, full chunks, tail length) covering ``length`` positions."""
    chunk = length if chunk_len <= 0 else min(chunk_len, length)
    return chunk, length // chunk, length % chunk


def _one_pass(x: Array, targets: Array) -> tuple[Array, Array, Array, Array]:
    """One read of (..., V) logits for what needs no maximum: each row's largest value and its
    first index, the target's logit and the row's sum. Separately, ``jnp.max``, ``jnp.argmax``,
    the target's gather (which the GPU compiler turned into a select over the whole row) and
    ``jnp.mean`` each read the vocabulary-sized logits once more."""
    index = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
    target = jnp.where(index == targets[..., None], x, 0.0)

    def combine(a, b):
        (value_a, index_a, target_a, sum_a), (value_b, index_b, target_b, sum_b) = a, b
        take_a = (value_a > value_b) | ((value_a == value_b) & (index_a < index_b))
        top = jnp.where(take_a, value_a, value_b), jnp.where(take_a, index_a, index_b)
        return *top, target_a + target_b, sum_a + sum_b

    zero = jnp.array(0, x.dtype)
    init = (jnp.array(-jnp.inf, x.dtype), jnp.array(0, jnp.int32), zero, zero)
    return jax.lax.reduce((x, index, target, x), init, combine, (x.ndim - 1,))


def _chunk_forward(x: Array, targets: Array, label_smoothing: float) -> tuple[Array, Array, Array]:
    """(B, c, V) logits of any dtype -> per-token loss, log-sum-exp and whether the target is
    the first largest logit (float32 0/1), each (B, c), in two reads of the logits: ``_one_pass``
    then the sum of exponentials, which needs the maximum."""
    x = x.astype(jnp.float32)
    top, best, target, total = _one_pass(x, targets)
    top = jnp.where(jnp.isfinite(top), top, 0.0)  # as jax.nn.logsumexp: all -inf stays -inf
    lse = top + jnp.log(jnp.sum(jnp.exp(x - top[..., None]), axis=-1))
    nll = lse - target
    if label_smoothing:
        nll = (1.0 - label_smoothing) * nll + label_smoothing * (lse - total / x.shape[-1])
    return nll, lse, (best == targets).astype(jnp.float32)


def _chunk_backward(
    x: Array, targets: Array, lse: Array, g: Array, label_smoothing: float
) -> Array:
    """d loss / d logits for one chunk, in the logits' dtype: g·(softmax − (1−ε)·onehot − ε/V)."""
    probs = jnp.exp(x.astype(jnp.float32) - lse[..., None])
    vocab = x.shape[-1]
    onehot = jnp.arange(vocab) == targets[..., None]
    grad = probs - (1.0 - label_smoothing) * onehot - label_smoothing / vocab
    return (g[..., None] * grad).astype(x.dtype)


def _over_chunks(fn, length: int, chunk_len: int, init, *arrays):
    """Run ``fn(carry, start, size, *arrays) -> carry`` over the sequence in chunks: a loop over
    the full chunks (one compiled body, buffers reused) and the tail, if any."""
    chunk, full, tail = _chunk_starts(length, chunk_len)
    carry = init
    if full:
        carry = jax.lax.fori_loop(0, full, lambda i, c: fn(c, i * chunk, chunk, *arrays), carry)
    if tail:
        carry = fn(carry, full * chunk, tail, *arrays)
    return carry


def _slice(x: Array, start: Any, size: int) -> Array:
    """Positions ``start:start+size`` of ``x``. The barrier keeps XLA from swapping the slice
    with the float32 conversion that follows and hoisting that out of the loop, which would
    convert the whole logits array at once (seen on CPU)."""
    return jax.lax.optimization_barrier(jax.lax.dynamic_slice_in_dim(x, start, size, axis=1))


def _token_ce_fwd(logits, targets, label_smoothing, chunk_len):
    b, length = targets.shape

    def body(carry, start, size, logits, targets):
        parts = _chunk_forward(
            _slice(logits, start, size), _slice(targets, start, size), label_smoothing
        )
        return tuple(
            jax.lax.dynamic_update_slice_in_dim(whole, part, start, axis=1)
            for whole, part in zip(carry, parts, strict=True)
        )

    zeros = jnp.zeros((b, length), jnp.float32)
    nll, lse, correct = _over_chunks(body, length, chunk_len, (zeros,) * 3, logits, targets)
    return (nll, correct), (logits, targets, lse)


def _token_ce_bwd(label_smoothing, chunk_len, residuals, cotangents):
    logits, targets, lse = residuals
    g = cotangents[0]  # the top-1 indicator has no gradient

    def body(grad, start, size, logits, targets, lse, g):
        part = _chunk_backward(
            _slice(logits, start, size),
            _slice(targets, start, size),
            _slice(lse, start, size),
            _slice(g, start, size),
            label_smoothing,
        )
        return jax.lax.dynamic_update_slice_in_dim(grad, part, start, axis=1)

    length = targets.shape[1]
    grad = _over_chunks(body, length, chunk_len, jnp.zeros_like(logits), logits, targets, lse, g)
    return grad, None


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def token_cross_entropy(
    logits: Array, targets: Array, label_smoothing: float = 0.0, chunk_len: int = 0
) -> tuple[Array, Array]:
    """Per-token (label-smoothed) cross-entropy and top-1 correctness (1.0 where the target is
    the first largest logit), float32 (B, L) each, from (B, L, V) logits.

    Computed ``chunk_len`` positions at a time (0: all at once) in float32 from logits kept in
    their own dtype; the backward pass saves only the logits and a (B, L) log-sum-exp, and
    writes the logits' gradient chunk by chunk in their dtype. The correctness comes from the
    same pass that finds each row's maximum, rather than from one more read of the logits.
    """
    return _token_ce_fwd(logits, targets, label_smoothing, chunk_len)[0]


def _token_ce_fwd_rule(logits, targets, label_smoothing, chunk_len):
    return _token_ce_fwd(logits, targets, label_smoothing, chunk_len)


token_cross_entropy.defvjp(_token_ce_fwd_rule, _token_ce_bwd)


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
            loss_config.get("caption_chunk_len", DEFAULT_CHUNK_LEN),
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
