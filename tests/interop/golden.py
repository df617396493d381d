"""The open_clip golden fixtures (``tests/fixtures/open_clip``, see its ``make_fixtures.py``)."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from sycoca_jax.data.tokenizer import SpecialIds
from sycoca_jax.interop import open_clip_config
from sycoca_jax.models import sycoca
from tests.helpers import ROOT

DIRECTORY = ROOT / "tests" / "fixtures" / "open_clip"
MANIFEST: dict[str, Any] = json.loads((DIRECTORY / "models.json").read_text())


def fields(name: str, cls_mask: str = "legacy", **overrides: Any) -> dict[str, Any]:
    """SyCoCa fields of a fixture model (CoCa objective, float32, unrolled unless overridden)."""
    spec = MANIFEST[name]
    out = open_clip_config.model_fields(
        spec["config"], SpecialIds(**spec["special_ids"]), cls_mask=cls_mask
    )
    out.update(use_tgmim=False, caption_masking="none", dtype="float32", scan=False)
    out.update(overrides)
    return out


def model(name: str, cls_mask: str = "legacy", **overrides: Any) -> sycoca.SyCoCa:
    return sycoca.SyCoCa(**fields(name, cls_mask, **overrides))


def weights_path(name: str) -> str:
    return str(DIRECTORY / f"{name}.safetensors")


def outputs(name: str, cls_mask: str) -> dict[str, np.ndarray]:
    """open_clip's inputs and outputs: images (NHWC), text, image_embedding, text_embedding,
    image_tokens, logits, greedy."""
    with np.load(DIRECTORY / f"{name}_{cls_mask}.npz", allow_pickle=False) as data:
        return dict(data)
