"""The open_clip CoCa presets: their model configs (as released with open_clip 3.3.0), tokenizers,
and the SyCoCa fields ``configs/open_clip.py`` and the importer build from them."""

from __future__ import annotations

import copy
import json
import os
from typing import Any

from sycoca_jax.data.tokenizer import SENTENCEPIECE_IDS, SpecialIds
from sycoca_jax.interop.open_clip_config import (
    CLIP_IDS,
    OpenClipError,
    OpenClipFileNotFoundError,
    model_fields,
)

# The open_clip CoCa models (their model_configs, as released with open_clip 3.3.0), and
# coca_tiny: the same layout at a size for CPUs and tests, with the embedded data's tokenizer.
OPEN_CLIP_MODELS: dict[str, dict[str, Any]] = {
    "coca_ViT-B-32": dict(
        embed_dim=512,
        vision_cfg=dict(
            image_size=224,
            layers=12,
            width=768,
            patch_size=32,
            attentional_pool=True,
            attn_pooler_heads=8,
            output_tokens=True,
        ),
        text_cfg=dict(
            context_length=76,
            vocab_size=49408,
            width=512,
            heads=8,
            layers=12,
            embed_cls=True,
            output_tokens=True,
        ),
        multimodal_cfg=dict(
            context_length=76, vocab_size=49408, width=512, heads=8, layers=12, attn_pooler_heads=8
        ),
        custom_text=True,
    ),
    "coca_ViT-L-14": dict(
        embed_dim=768,
        vision_cfg=dict(
            image_size=224,
            layers=24,
            width=1024,
            patch_size=14,
            attentional_pool=True,
            attn_pooler_heads=8,
            output_tokens=True,
        ),
        text_cfg=dict(
            context_length=76,
            vocab_size=49408,
            width=768,
            heads=12,
            layers=12,
            embed_cls=True,
            output_tokens=True,
        ),
        multimodal_cfg=dict(
            context_length=76,
            vocab_size=49408,
            width=768,
            heads=12,
            layers=12,
            attn_pooler_heads=12,
        ),
        custom_text=True,
    ),
    "coca_base": dict(
        embed_dim=512,
        multimodal_cfg=dict(
            width=768,
            context_length=76,
            vocab_size=64000,
            mlp_ratio=4,
            layers=12,
            dim_head=64,
            heads=12,
            n_queries=256,
            attn_pooler_heads=8,
        ),
        vision_cfg=dict(image_size=288, layers=12, width=768, patch_size=18, output_tokens=True),
        text_cfg=dict(
            context_length=76,
            vocab_size=64000,
            layers=12,
            heads=12,
            width=768,
            embed_cls=True,
            output_tokens=True,
        ),
        custom_text=True,
    ),
    "coca_tiny": dict(
        embed_dim=64,
        vision_cfg=dict(
            image_size=64,
            layers=2,
            width=64,
            head_width=32,
            patch_size=8,
            attentional_pool=True,
            attn_pooler_queries=16,
            attn_pooler_heads=2,
            output_tokens=True,
        ),
        text_cfg=dict(
            context_length=24,
            vocab_size=512,
            width=64,
            heads=2,
            layers=2,
            embed_cls=True,
            output_tokens=True,
        ),
        multimodal_cfg=dict(context_length=24, vocab_size=512, width=64, heads=2, layers=2),
        custom_text=True,
    ),
}
# The tokenizer each preset was trained with (``config.data.tokenizer``; None: the dataset's
# bundled SentencePiece model) and its special ids.
TOKENIZERS: dict[str, tuple[str | None, SpecialIds]] = {
    "coca_ViT-B-32": ("clip_bpe", CLIP_IDS),
    "coca_ViT-L-14": ("clip_bpe", CLIP_IDS),
    "coca_base": ("clip_bpe", CLIP_IDS),
    "coca_tiny": (None, SENTENCEPIECE_IDS),
}

# The head the import adds for objective=sycoca, and the compute layout, per preset.
TGMIM_HEAD = dict(decoder_width=512, decoder_depth=4, decoder_heads=16, decoder_mlp_dim=2048)
TINY_TGMIM_HEAD = dict(decoder_width=64, decoder_depth=1, decoder_heads=2, decoder_mlp_dim=256)
OBJECTIVES = {
    "sycoca": dict(
        use_captioning=True, use_tgmim=True, caption_masking="attentive", tgmim_masking="attentive"
    ),
    "coca": dict(use_captioning=True, use_tgmim=False, caption_masking="none"),
}


def preset(name: str) -> dict[str, Any]:
    """The open_clip model config of a preset name, or read from a ``.json`` file (open_clip's
    model config format)."""
    if name.endswith(".json"):
        if not os.path.exists(name):
            raise OpenClipFileNotFoundError(f"no open_clip model config at {name!r}")
        with open(name, encoding="utf-8") as f:
            return json.load(f)
    if name not in OPEN_CLIP_MODELS:
        raise OpenClipError(
            f"unknown open_clip model {name!r}; known: {', '.join(OPEN_CLIP_MODELS)}"
        )
    return copy.deepcopy(OPEN_CLIP_MODELS[name])


def model_config(name: str, objective: str = "coca") -> dict[str, Any]:
    """Every SyCoCa field a preset sets: the architecture, the objective's switches, the TG-MIM
    head (for ``sycoca``) and the compute layout (``scan``, ``dtype``)."""
    if objective not in OBJECTIVES:
        raise OpenClipError(f"unknown objective {objective!r}; known: {', '.join(OBJECTIVES)}")
    _, special = TOKENIZERS.get(name, ("clip_bpe", CLIP_IDS))
    fields = model_fields(preset(name), special)
    tiny = name == "coca_tiny"
    fields.update(TINY_TGMIM_HEAD if tiny else TGMIM_HEAD)
    fields.update(OBJECTIVES[objective])
    fields.update(scan=not tiny, dtype="float32" if tiny else "bfloat16")
    return fields


def imported_subtrees(fields: dict[str, Any]) -> tuple[str, ...]:
    """The parameter subtrees an open_clip CoCa provides (everything else is new)."""
    names = ["image_encoder", "text_encoder", "multimodal_decoder"]
    if fields["pooler"] != "none":
        names.append("caption_pooler")
    return (*names, "image_projection", "text_projection", "log_temperature")
