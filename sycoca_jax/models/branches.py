"""The training forward's masked branches (``SyCoCa.__call__``): which patches the captioning
and TG-MIM branches see (attentive masking from the text-patch relevance, random, or none) and
what each predicts from them.

Each function takes the bound ``SyCoCa`` module (``model``), so it runs inside its ``__call__``
with the model's parameters and its ``masking`` rng.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

from sycoca_jax.models import masking
from sycoca_jax.models.tgmim import normalized_patch_targets

if TYPE_CHECKING:
    from sycoca_jax.models.sycoca import SyCoCa

Array = jax.Array


def needs_relevance(model: SyCoCa) -> bool:
    """Whether a branch masks attentively, i.e. needs the text-patch relevance scores."""
    return (model.use_captioning and model.caption_masking == "attentive") or (
        model.use_tgmim and model.tgmim_masking == "attentive"
    )


def relevance(model: SyCoCa, patch_states: Array, token_states: Array, text_valid: Array) -> Array:
    """Relevance (B, N) of each patch to the caption (``masking.relevance_scores``)."""
    return masking.relevance_scores(
        model.patch_embeddings(model.patches(patch_states)),
        model.text_projection(token_states),
        text_valid,
        model.score_mode,
        model.temperature(),
    )


def _scores(model: SyCoCa, mode: str, relevance: Array | None, batch: int) -> Array | None:
    shape = jnp.zeros((batch, model.num_patches), jnp.float32)
    return masking.masking_scores(
        mode,
        shape if relevance is None else relevance,
        model.make_rng("masking") if mode == "random" else None,
    )


def caption(
    model: SyCoCa,
    images: Array,
    patch_states: Array,
    token_states: Array,
    targets: Array,
    relevance: Array | None,
) -> dict[str, Array]:
    """The captioning branch on the kept patches: ``caption_logits/targets/weights`` and, when
    it masks, ``caption_indices`` (B, K)."""
    out: dict[str, Array] = {}
    scores = _scores(model, model.caption_masking, relevance, patch_states.shape[0])
    kept_states = patch_states
    if scores is not None:
        num_keep = masking.static_count(
            model.num_patches, model.caption_keep_ratio, "caption_keep_ratio"
        )
        indices = masking.keep_most_relevant(scores, num_keep)
        kept_states = model.branch_states(images, patch_states, indices)
        out["caption_indices"] = indices
    out["caption_logits"] = model.multimodal_decoder(token_states, model.image_tokens(kept_states))
    out["caption_targets"] = targets
    out["caption_weights"] = (targets != model.pad_id).astype(jnp.float32)
    return out


def tgmim(
    model: SyCoCa,
    images: Array,
    patch_states: Array,
    token_states: Array,
    text_valid: Array,
    relevance: Array | None,
) -> dict[str, Array]:
    """The TG-MIM branch: the hidden patches' pixels predicted from the visible ones and the
    caption; ``tgmim_prediction/target/mask``."""
    scores = _scores(model, model.tgmim_masking, relevance, patch_states.shape[0])
    num_masked = masking.static_count(model.num_patches, model.tgmim_mask_ratio, "tgmim_mask_ratio")
    visible, masked = masking.mask_most_relevant(scores, num_masked)
    visible_states = model.patches(model.branch_states(images, patch_states, visible))
    prediction = model.tgmim_decoder(visible_states, visible, token_states, text_valid)
    return {
        "tgmim_prediction": prediction.astype(jnp.float32),
        "tgmim_target": normalized_patch_targets(images, model.patch_size, model.norm_pix_loss),
        "tgmim_mask": masking.indices_to_mask(masked, model.num_patches),
    }
