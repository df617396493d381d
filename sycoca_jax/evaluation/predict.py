"""Predict functions: what evaluators call instead of a model's methods (big_vision's design).

An evaluator needs some of these, each a function of ``(params, ...)``:

- ``encode_images(params, images (B, H, W, 3)) -> (B, E)`` unit-norm contrastive embeddings;
- ``encode_texts(params, tokens (B, L+1)) -> (B, E)`` unit-norm contrastive embeddings;
- ``caption(params, images, rng, settings) -> (B, max_len + 1)`` token ids ``[bos, ..., eos,
  pad...]``; ``settings`` is a hashable tuple of ``sycoca_jax.decoding.generate`` keyword pairs
  (static: one compilation per setting);
- ``masking(params, images, tokens (B, L+1), rng) -> dict``: the training branches' choices for
  these pairs, under the training forward's names: ``relevance`` (B, N) where a branch masks
  attentively, ``caption_indices`` (B, K) the patches the captioner keeps, ``tgmim_mask`` (B, N)
  True where TG-MIM hides a patch;
- ``relevance_inputs(params, images, tokens (B, L+1)) -> dict``: what attentive masking scores
  the patches from (for measuring it, whether or not a branch masks attentively):
  ``patch_embeddings`` (B, N, E) and ``token_embeddings`` (B, T, E) (projected, not normalised),
  ``token_valid`` (B, T), ``text_embedding`` (B, E) unit norm and the contrastive
  ``temperature`` (); ``models.masking.relevance_scores`` of these is the training relevance;
- ``encode_image_patches(params, images, patch_indices (B, K)) -> (B, E)``: the unit-norm
  contrastive embedding of the images seeing only those patches (what leaving a patch out costs).

A model that cannot compute one leaves it None, and the registry drops (or rejects) evaluators
that need it. Any model can be evaluated by building ``Predictors`` from its own functions (a
transfer model's towers, an imported open_clip model); ``for_model`` builds them for ``SyCoCa``.

Every function must be traced under the evaluation's ``Placement.context()``, which the
evaluators do. ``for_model``'s functions are module-level ``jax.jit``s with the model (hashable by
value) as a static argument: building them again for the same model, as the training loop does at
each evaluation, reuses the compilations.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax

from sycoca_jax import decoding
from sycoca_jax.models.sycoca import SyCoCa

MASKING_KEYS = ("relevance", "caption_indices", "tgmim_mask")


@dataclasses.dataclass(frozen=True)
class Predictors:
    """The predict functions of one model (module docstring); None where the model has none."""

    encode_images: Callable[[Any, jax.Array], jax.Array] | None = None
    encode_texts: Callable[[Any, jax.Array], jax.Array] | None = None
    caption: Callable[[Any, jax.Array, jax.Array, tuple], jax.Array] | None = None
    masking: Callable[[Any, jax.Array, jax.Array, jax.Array], dict[str, jax.Array]] | None = None
    relevance_inputs: Callable[[Any, jax.Array, jax.Array], dict[str, jax.Array]] | None = None
    encode_image_patches: Callable[[Any, jax.Array, jax.Array], jax.Array] | None = None

    def available(self) -> frozenset[str]:
        """Names of the functions this model has."""
        return frozenset(
            f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None
        )


@functools.partial(jax.jit, static_argnums=0)
def _encode_images(model: SyCoCa, params: Any, images: jax.Array) -> jax.Array:
    return model.apply({"params": params}, images, method=SyCoCa.encode_image)["embedding"]


@functools.partial(jax.jit, static_argnums=0)
def _encode_texts(model: SyCoCa, params: Any, tokens: jax.Array) -> jax.Array:
    return model.apply({"params": params}, tokens, method=SyCoCa.encode_text)["embedding"]


@functools.partial(jax.jit, static_argnums=(0, 4))
def _caption(
    model: SyCoCa, params: Any, images: jax.Array, rng: jax.Array, settings: tuple
) -> jax.Array:
    kwargs = dict(settings)
    rng = rng if kwargs.get("method") == "sample" else None
    return decoding.caption_images(model, params, images, rng=rng, **kwargs).tokens


@functools.partial(jax.jit, static_argnums=0)
def _masking(
    model: SyCoCa, params: Any, images: jax.Array, tokens: jax.Array, rng: jax.Array
) -> dict[str, jax.Array]:
    # The training forward; XLA drops the branches' computations nobody reads.
    out = model.apply({"params": params}, images, tokens, rngs={"masking": rng})
    return {k: out[k] for k in MASKING_KEYS if k in out}


@functools.partial(jax.jit, static_argnums=0)
def _relevance_inputs(
    model: SyCoCa, params: Any, images: jax.Array, tokens: jax.Array
) -> dict[str, jax.Array]:
    return model.apply({"params": params}, images, tokens, method=SyCoCa.relevance_inputs)


@functools.partial(jax.jit, static_argnums=0)
def _encode_image_patches(
    model: SyCoCa, params: Any, images: jax.Array, patch_indices: jax.Array
) -> jax.Array:
    return model.apply({"params": params}, images, patch_indices, method=SyCoCa.image_embedding)


def masks_patches(model: SyCoCa) -> bool:
    """Whether a training branch of ``model`` chooses patches (so ``masking`` has an output)."""
    captioner_masks = model.use_captioning and model.caption_masking != "none"
    return captioner_masks or model.use_tgmim


def for_model(model: SyCoCa) -> Predictors:
    """A ``SyCoCa``'s predict functions (a CLIP-objective model has no ``caption``)."""
    return Predictors(
        encode_images=functools.partial(_encode_images, model),
        encode_texts=functools.partial(_encode_texts, model),
        caption=functools.partial(_caption, model) if model.use_captioning else None,
        masking=functools.partial(_masking, model) if masks_patches(model) else None,
        relevance_inputs=functools.partial(_relevance_inputs, model),
        encode_image_patches=functools.partial(_encode_image_patches, model),
    )
