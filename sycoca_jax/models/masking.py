"""Attentive masking: text-to-patch relevance scores and static-count patch selection.

Everything here has static output shapes (counts are Python ints), so the train step compiles
once; ties in ``top_k`` go to the lower patch index, as a stable argsort would.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sycoca_jax.models import layers

Array = jax.Array

SCORE_MODES = ("max_sim", "attention", "centred_max_sim")
MASKING_MODES = ("attentive", "random", "none")


def relevance_scores(
    patch_embeddings: Array,
    token_embeddings: Array,
    token_valid: Array,
    mode: str = "max_sim",
    temperature: Array | float = 100.0,
) -> Array:
    """How relevant each patch is to the caption, (B, N), with no gradient.

    patch_embeddings (B, N, E) and token_embeddings (B, T, E) live in the contrastive space;
    token_valid (B, T) marks real (non-pad) tokens.
    - ``max_sim``: max over real tokens of cos(patch, token) (FILIP-style).
    - ``attention``: softmax over patches of temperature * cos(token, patch) for each real
      token, averaged over the real tokens.
    - ``centred_max_sim``: max over the caption's words (``caption_words``) of the dot product
      of the unit patch and word embeddings after subtracting their means (the image's mean
      patch, the caption's mean word). What every patch of an image shares (the common mode a
      trained ViT spreads over its background patches) and what every word shares no longer
      counts; on ``sycoca_shapes`` this finds the described objects where ``max_sim`` ranks
      them below the background (measured by ``sycoca_jax.evaluation.mechanism``).
    """
    p = layers.l2_normalize(jax.lax.stop_gradient(patch_embeddings))
    t = layers.l2_normalize(jax.lax.stop_gradient(token_embeddings))
    temperature = jax.lax.stop_gradient(temperature)
    sim = jnp.einsum("bne,bte->bnt", p, t)
    valid = token_valid[:, None, :]
    if mode == "max_sim":
        return jnp.max(jnp.where(valid, sim, -jnp.inf), axis=-1)
    if mode == "attention":
        attn = jax.nn.softmax(sim * temperature, axis=1)  # over patches
        count = jnp.maximum(jnp.sum(token_valid, axis=-1), 1)[:, None]
        return jnp.sum(jnp.where(valid, attn, 0.0), axis=-1) / count
    if mode == "centred_max_sim":
        words = caption_words(token_valid)
        centred_p = p - jnp.mean(p, axis=1, keepdims=True)
        count = jnp.maximum(jnp.sum(words, axis=-1), 1)[:, None, None]
        mean_word = jnp.sum(jnp.where(words[..., None], t, 0.0), axis=1, keepdims=True) / count
        centred = jnp.einsum("bne,bte->bnt", centred_p, t - mean_word)
        return jnp.max(jnp.where(words[:, None, :], centred, -jnp.inf), axis=-1)
    raise ValueError(f"score mode must be one of {SCORE_MODES}, got {mode!r}")


def caption_words(token_valid: Array) -> Array:
    """(B, T) real tokens -> the caption's words: without the first (bos) and the last real
    token (eos; kept even when a caption is truncated). Token layout: ``[bos, w..., eos, pad]``."""
    position = jnp.arange(token_valid.shape[-1])
    last = jnp.sum(token_valid, axis=-1, keepdims=True) - 1
    return token_valid & (position > 0) & (position < last)


def static_count(num_patches: int, ratio: float, what: str) -> int:
    """round(num_patches * ratio), required to leave at least one patch on each side."""
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"{what} must be in (0, 1), got {ratio}")
    count = int(round(num_patches * ratio))
    if not 0 < count < num_patches:
        raise ValueError(f"{what}={ratio} of {num_patches} patches leaves an empty side")
    return count


def masking_scores(mode: str, relevance: Array, rng: Array | None) -> Array | None:
    """Scores that drive selection: relevance (``attentive``), noise (``random``), or None."""
    if mode == "attentive":
        return relevance
    if mode == "random":
        if rng is None:
            raise ValueError("random masking needs an rng")
        return jax.random.uniform(rng, relevance.shape)
    if mode == "none":
        return None
    raise ValueError(f"masking mode must be one of {MASKING_MODES}, got {mode!r}")


def keep_most_relevant(scores: Array, num_keep: int) -> Array:
    """Indices (B, num_keep) of the highest-scoring patches, best first (the IC branch)."""
    return jax.lax.top_k(scores, num_keep)[1]


def mask_most_relevant(scores: Array, num_masked: int) -> tuple[Array, Array]:
    """(visible (B, N - num_masked), masked (B, num_masked)) indices: the most relevant
    patches are hidden (the TG-MIM branch)."""
    order = jax.lax.top_k(scores, scores.shape[-1])[1]
    return order[:, num_masked:], order[:, :num_masked]


def indices_to_mask(indices: Array, num_patches: int) -> Array:
    """(B, K) indices -> (B, N) boolean, True at the given patches."""
    return jnp.any(indices[..., None] == jnp.arange(num_patches), axis=-2)
