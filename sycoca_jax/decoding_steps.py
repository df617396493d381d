"""The pieces of one decoding step that every search in ``sycoca_jax.decoding`` shares: the model
in decode mode (``Stepper``), the KV-cache reshaping beam search needs, the logits bans and
filters, and the length-normalised score. Apart from ``decoding`` so that module holds only the
searches and their entry point.

Protocol (``SyCoCa.decode_step`` with ``decode=True``): the first step feeds ``bos`` together
with the image tokens, which fills the cross-attention cache; every later step feeds the one
token just chosen with ``image_tokens=None``. The cache holds self-attention keys/values for
``max_text_len`` positions, so at most ``max_text_len`` tokens are fed and a caption has at most
``max_len <= max_text_len`` generated tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from sycoca_jax.data.tokenizer import SpecialIds
from sycoca_jax.models.build import init_decode_cache
from sycoca_jax.models.sycoca import SyCoCa

Array = jax.Array

# Cache leaves with a batch axis (per-layer (B, S, H, Dh); scanned blocks add a leading layers
# axis, so the batch axis is ``ndim - 4``) and the shared position counters (no batch axis).
_BATCHED_CACHE = ("cached_key", "cached_value", "context_key", "context_value")
_COUNTERS = ("index", "position")
# The image context is the same for every beam of an image: beam reordering leaves it alone.
_CONTEXT_CACHE = ("context_key", "context_value")


# ------------------------------------------------------------------------------- logits helpers
def mask_logits(
    logits: Array,
    step: Array | int,
    min_len: int = 0,
    num_tokens: int | None = None,
    *,
    special: SpecialIds,
) -> Array:
    """float32 logits (..., V) for choosing generated token ``step + 1`` (``step`` tokens exist):
    pad and bos never, eos not before ``min_len`` tokens, no id >= ``num_tokens`` (a model's
    vocabulary may be padded past its tokenizer's, which cannot decode those ids)."""
    logits = logits.astype(jnp.float32)
    vocab = jnp.arange(logits.shape[-1])
    banned = (vocab == special.pad) | (vocab == special.bos)
    if num_tokens is not None:
        banned = banned | (vocab >= num_tokens)
    banned = banned | ((vocab == special.eos) & (jnp.asarray(step) < min_len))
    return jnp.where(banned, -jnp.inf, logits)


def sampling_logits(
    log_probs: Array,
    temperature: float | Array = 1.0,
    top_k: int | Array = 0,
    top_p: float | Array = 1.0,
) -> Array:
    """The logits ``jax.random.categorical`` samples from: divided by ``temperature``, then only
    the ``top_k`` most likely tokens (0 = all; ties with the k-th are kept), then the smallest
    most-likely set whose probability reaches ``top_p`` (nucleus; the best token is always kept).
    Every argument may be traced, so one compiled sampler serves every setting."""
    logits = log_probs.astype(jnp.float32) / jnp.asarray(temperature, jnp.float32)
    vocab = logits.shape[-1]
    ordered = jnp.sort(logits, axis=-1)[..., ::-1]  # one sort serves both filters
    rank = jnp.arange(vocab)
    top_k = jnp.asarray(top_k, jnp.int32)
    keep = (top_k <= 0) | (rank < top_k)
    # Nucleus over what top-k left: keep a token if the mass strictly before it is < top_p.
    probs = jax.nn.softmax(jnp.where(keep, ordered, -jnp.inf), axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = (keep & (mass_before < jnp.asarray(top_p, jnp.float32))) | (rank == 0)
    cutoff = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits < cutoff, -jnp.inf, logits)


def length_normalized(log_prob: Array, length: Array, length_penalty: float | Array) -> Array:
    """``log_prob / length ** length_penalty`` (0 = plain log-prob, 1 = per-token mean)."""
    length = jnp.maximum(length, 1).astype(jnp.float32)
    return log_prob / length ** jnp.asarray(length_penalty, jnp.float32)


# ------------------------------------------------------------------------------- the KV cache
def _map_cache(fn: Callable[[str, Array, int], Array], cache: Any) -> Any:
    """``fn(name, leaf, batch_axis)`` on every batched cache leaf; counters pass through."""

    def visit(path, leaf):
        name = getattr(path[-1], "key", None)
        if name in _COUNTERS:
            return leaf
        if name not in _BATCHED_CACHE:
            raise ValueError(f"unexpected decode cache entry {jax.tree_util.keystr(path)}")
        return fn(name, leaf, leaf.ndim - 4)

    return jax.tree_util.tree_map_with_path(visit, cache)


def expand_cache(cache: Any, num_beams: int) -> Any:
    """Every example's cache repeated ``num_beams`` times: row b -> rows b*K ... b*K + K-1."""
    return _map_cache(lambda _, x, axis: jnp.repeat(x, num_beams, axis=axis), cache)


def reorder_cache(cache: Any, source_beam: Array) -> Any:
    """Beam k of image b takes the cache of beam ``source_beam[b, k]`` of the same image.

    The gather runs on a (B, K) view, within each image, so a batch split over devices stays
    local; the image context (identical for all beams of an image) is not touched."""
    b, k = source_beam.shape

    def gather(name: str, x: Array, axis: int) -> Array:
        if name in _CONTEXT_CACHE:
            return x
        shape = x.shape
        x = x.reshape(shape[:axis] + (b, k) + shape[axis + 1 :])
        index = source_beam.reshape((1,) * axis + (b, k) + (1,) * (x.ndim - axis - 2))
        return jnp.take_along_axis(x, index, axis=axis + 1).reshape(shape)

    return _map_cache(gather, cache)


class Stepper:
    """The model in decode mode: ``first`` fills the cache from the image tokens and bos,
    ``next`` feeds one more token per row. Both return float32 logits (B, V)."""

    def __init__(self, model: SyCoCa, params: Any, special: SpecialIds):
        self.decoder = model.clone(decode=True)
        self.params = params
        self.special = special

    def _apply(self, cache: Any, image_tokens: Array | None, tokens: Array) -> tuple[Array, Any]:
        logits, updated = self.decoder.apply(
            {"params": self.params, "cache": cache},
            image_tokens,
            tokens,
            method=SyCoCa.decode_step,
            mutable=["cache"],
        )
        return logits[:, -1].astype(jnp.float32), updated["cache"]

    def first(self, image_tokens: Array) -> tuple[Array, Any]:
        batch = image_tokens.shape[0]
        cache = init_decode_cache(self.decoder, batch)
        bos = jnp.full((batch, 1), self.special.bos, jnp.int32)
        return self._apply(cache, image_tokens, bos)

    def next(self, cache: Any, tokens: Array) -> tuple[Array, Any]:
        return self._apply(cache, None, tokens.reshape(-1, 1))
