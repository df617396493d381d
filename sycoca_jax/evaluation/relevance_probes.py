"""Other ways of scoring patches against a caption, to compare with the model's relevance
(``sycoca_jax.evaluation.mechanism`` reports each one's AUROC).

``CHEAP`` scores come from the same patch/token similarities as ``max_sim``; ``COSTLY`` ones
need more passes through the model (its predict functions).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sycoca_jax.evaluation.predict import Predictors
from sycoca_jax.models import pixels
from sycoca_jax.models.layers import l2_normalize
from sycoca_jax.models.vit import patchify

# Scores that cost more than one forward (the mechanism entry's ``probes`` switches them on):
# ``contrast``: max_sim minus the patch's mean max_sim to the batch's other captions (B x more
# similarities); ``gradient``: gradient x input of the image-caption similarity, summed per
# patch (one backward); ``occlusion``: how much the image-caption similarity drops without the
# patch (one image-tower pass per patch).
COSTLY = ("contrast", "gradient", "occlusion")


def costly(
    predictors: Predictors,
    params: Any,
    probes: tuple[str, ...],
    images: jax.Array,
    tokens: jax.Array,
    patch_size: int,
) -> dict[str, jax.Array]:
    """``COSTLY`` scores (B, N) of the patches (``patch_size`` pixels square) for their own
    captions, through the predict functions (``mechanism.PROBE_NEEDS``)."""
    out: dict[str, jax.Array] = {}
    if "contrast" in probes:
        out["contrast"] = _contrast(predictors.relevance_inputs(params, images, tokens))
    if "gradient" in probes or "occlusion" in probes:
        text = predictors.encode_texts(params, tokens)
    if "gradient" in probes:
        out["gradient"] = _gradient(predictors.encode_images, patch_size, params, images, text)
    if "occlusion" in probes:
        out["occlusion"] = _occlusion(
            predictors.encode_images,
            predictors.encode_image_patches,
            patch_size,
            params,
            images,
            text,
        )
    return out


@jax.jit
def _contrast(inputs: dict[str, jax.Array]) -> jax.Array:
    """max_sim minus the patch's mean max_sim to the batch's other captions."""
    patches = l2_normalize(inputs["patch_embeddings"])
    words = l2_normalize(inputs["token_embeddings"])
    valid = inputs["token_valid"]

    def to_caption(args):  # every image's patches against one caption: (B, N)
        caption, caption_valid = args
        sim = jnp.einsum("bne,te->bnt", patches, caption)
        return jnp.max(jnp.where(caption_valid, sim, -jnp.inf), axis=-1)

    real = valid.any(-1)  # placeholder rows have no tokens
    sims = jax.lax.map(to_caption, (words, valid))  # (C, B, N)
    sims = jnp.where(real[:, None, None], sims, 0.0)
    own = jnp.diagonal(sims, axis1=0, axis2=1).T  # caption b against image b
    others = (sims.sum(0) - own) / jnp.maximum(real.sum() - real, 1)[:, None]
    return own - others


# The predict functions are static arguments: compiled once per evaluation (for_model builds
# new ones each time), reused over its batches.
@functools.partial(jax.jit, static_argnums=(0, 1))
def _gradient(
    encode_images: Callable, patch_size: int, params: Any, images: jax.Array, text: jax.Array
) -> jax.Array:
    """Gradient x input of the image-caption similarity in the model's normalised pixel space,
    summed per patch."""
    normalised = pixels.normalize(images)  # the model leaves normalised floats as they are

    def similarity(x):
        return jnp.sum(encode_images(params, x) * text)

    grad = jax.grad(similarity)(normalised)
    return patchify(grad * normalised, patch_size).sum(-1)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _occlusion(
    encode_images: Callable,
    encode_image_patches: Callable,
    patch_size: int,
    params: Any,
    images: jax.Array,
    text: jax.Array,
) -> jax.Array:
    """How much the image-caption similarity drops without each patch (one pass per patch)."""
    n = (images.shape[1] // patch_size) * (images.shape[2] // patch_size)
    full = jnp.sum(encode_images(params, images) * text, -1)
    # Row i lists every patch but i.
    rest = jnp.stack([jnp.concatenate([jnp.arange(i), jnp.arange(i + 1, n)]) for i in range(n)])

    def without(indices):
        kept = jnp.broadcast_to(indices, (images.shape[0], n - 1))
        return full - jnp.sum(encode_image_patches(params, images, kept) * text, -1)

    return jax.lax.map(without, rest).T


def masked_max(x: np.ndarray, valid: np.ndarray, axis: int) -> np.ndarray:
    return np.max(np.where(valid, x, -np.inf), axis=axis)


def softmax_over_patches(sim: np.ndarray, temperature: float) -> np.ndarray:
    logits = sim * temperature
    logits = logits - logits.max(axis=1, keepdims=True)
    weights = np.exp(logits)
    return weights / weights.sum(axis=1, keepdims=True)


def centred(sim: np.ndarray, words: np.ndarray) -> np.ndarray:
    """The similarities of mean-centred patch and word embeddings (B, N, T): ``sim`` minus
    each word's mean over the patches and each patch's mean over the words, plus the overall
    mean (``masking.relevance_scores``' ``centred_max_sim`` before its max)."""
    per_word = sim.mean(1, keepdims=True)
    per_patch = mean_over(sim, words)[..., None]
    overall = mean_over(per_word, words)[..., None]
    return sim - per_word - per_patch + overall


def mean_over(x: np.ndarray, valid: np.ndarray) -> np.ndarray:
    return (x * valid[:, None]).sum(-1) / np.maximum(valid.sum(-1), 1)[:, None]


# Other scores of the same patch/token embeddings, from cos similarities ``sim`` (B, N, T),
# the caption-embedding similarity ``cls`` (B, N), real tokens ``valid`` and words ``words``
# (B, T, no bos/eos) and the model's ``temperature``:
# - max_sim / max_sim_words: the training score over all tokens / over words only;
# - mean_sim_words: mean instead of max; caption_embedding: against the caption's embedding;
# - peak_words: max minus mean over the words (a patch similar to every word is not relevant);
# - attention_max_words: each word's softmax over patches, max over words (text-to-patch
#   attention, top);
# - token_centred_words: each word's similarity minus its mean over the image's patches, max
#   over words; double_centred_words: minus the patch's mean over the words as well, i.e. the
#   ``centred_max_sim`` score mode.
CHEAP = {
    "max_sim": lambda a: masked_max(a["sim"], a["valid"][:, None], -1),
    "max_sim_words": lambda a: masked_max(a["sim"], a["words"][:, None], -1),
    "mean_sim_words": lambda a: mean_over(a["sim"], a["words"]),
    "caption_embedding": lambda a: a["cls"],
    "peak_words": lambda a: (
        masked_max(a["sim"], a["words"][:, None], -1) - mean_over(a["sim"], a["words"])
    ),
    "attention_max_words": lambda a: masked_max(
        softmax_over_patches(a["sim"], a["temperature"]), a["words"][:, None], -1
    ),
    "token_centred_words": lambda a: masked_max(
        a["sim"] - a["sim"].mean(1, keepdims=True), a["words"][:, None], -1
    ),
    "double_centred_words": lambda a: (
        masked_max(a["sim"] - a["sim"].mean(1, keepdims=True), a["words"][:, None], -1)
        - mean_over(a["sim"] - a["sim"].mean(1, keepdims=True), a["words"])
    ),
}
