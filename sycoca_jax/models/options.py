"""The choices SyCoCa's fields take, checked before the model builds anything.

Apart from ``sycoca.py`` so the module keeps to the model's computation; ``check`` takes the
model (or anything with its fields).
"""

from __future__ import annotations

from typing import Any

from sycoca_jax.models import layers, masking
from sycoca_jax.models.text import CLS_MASKS

# "none": no attentional pooler; the class token is the contrastive vector and the patch tokens
# are the image tokens (open_clip's coca_base).
POOLER_LAYOUTS = ("cascade", "parallel", "single", "none")
BRANCH_ENCODINGS = ("reencode", "reuse")


def check(m: Any) -> None:
    """Refuse field values SyCoCa cannot build, naming the field and its choices."""
    if m.pooler not in POOLER_LAYOUTS:
        raise ValueError(f"pooler must be one of {POOLER_LAYOUTS}, got {m.pooler!r}")
    if m.branch_encoding not in BRANCH_ENCODINGS:
        raise ValueError(
            f"branch_encoding must be one of {BRANCH_ENCODINGS}, got {m.branch_encoding!r}"
        )
    if m.pooler == "single" and m.caption_queries < 2:
        raise ValueError("the single pooler layout needs caption_queries >= 2")
    if m.pooler == "none" and not (m.class_token and m.image_width == m.text_width):
        raise ValueError(
            "pooler='none' reads the class token and hands the patch tokens to the "
            "multimodal decoder: it needs class_token=True and image_width == text_width, "
            f"got class_token={m.class_token}, {m.image_width} vs {m.text_width}"
        )
    if m.cls_mask not in CLS_MASKS:
        raise ValueError(f"cls_mask must be one of {CLS_MASKS}, got {m.cls_mask!r}")
    if m.layer_layout not in layers.LAYER_LAYOUTS:
        raise ValueError(
            f"layer_layout must be one of {layers.LAYER_LAYOUTS}, got {m.layer_layout!r}"
        )
    if m.use_tgmim and m.tgmim_masking == "none":
        raise ValueError("TG-MIM needs masked patches: tgmim_masking must not be 'none'")
    for mode in (m.caption_masking, m.tgmim_masking):
        if mode not in masking.MASKING_MODES:
            raise ValueError(f"masking mode must be one of {masking.MASKING_MODES}, got {mode!r}")
