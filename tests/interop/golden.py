"""The open_clip golden fixtures (``tests/fixtures/open_clip``, see its ``make_fixtures.py``) and
what our model computes on their inputs (shared by the parity tests and ``measure_parity``)."""

from __future__ import annotations

import json
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sycoca_jax import decoding
from sycoca_jax.data.tokenizer import SpecialIds
from sycoca_jax.interop import open_clip_config, open_clip_weights
from sycoca_jax.models import sycoca
from tests.helpers import ROOT

DIRECTORY = ROOT / "tests" / "fixtures" / "open_clip"


def load_manifest(directory: pathlib.Path = DIRECTORY) -> dict[str, Any]:
    return json.loads((pathlib.Path(directory) / "models.json").read_text())


MANIFEST: dict[str, Any] = load_manifest()


def fields(
    name: str, cls_mask: str = "legacy", manifest: dict | None = None, **overrides: Any
) -> dict[str, Any]:
    """SyCoCa fields of a fixture model (CoCa objective, float32, unrolled unless overridden)."""
    spec = (manifest or MANIFEST)[name]
    out = open_clip_config.model_fields(
        spec["config"], SpecialIds(**spec["special_ids"]), cls_mask=cls_mask
    )
    out.update(use_tgmim=False, caption_masking="none", dtype="float32", scan=False)
    out.update(overrides)
    return out


def model(name: str, cls_mask: str = "legacy", **overrides: Any) -> sycoca.SyCoCa:
    return sycoca.SyCoCa(**fields(name, cls_mask, **overrides))


def weights_path(name: str, directory: pathlib.Path = DIRECTORY) -> str:
    return str(pathlib.Path(directory) / f"{name}.safetensors")


def outputs(name: str, cls_mask: str, directory: pathlib.Path = DIRECTORY) -> dict[str, np.ndarray]:
    """open_clip's inputs and outputs: images (NHWC), text, image_embedding, text_embedding,
    image_tokens, logits, greedy."""
    with np.load(pathlib.Path(directory) / f"{name}_{cls_mask}.npz", allow_pickle=False) as data:
        return dict(data)


def imported(
    name: str, cls_mask: str, scan: bool, directory: pathlib.Path = DIRECTORY
) -> tuple[sycoca.SyCoCa, Any]:
    """The fixture model and its open_clip weights, imported (nothing freshly initialised)."""
    manifest = MANIFEST if directory == DIRECTORY else load_manifest(directory)
    net = sycoca.SyCoCa(**fields(name, cls_mask, manifest, scan=scan))
    state = open_clip_weights.read_safetensors(weights_path(name, directory))
    params, new_heads = open_clip_weights.to_params(state, net)
    assert new_heads == [], new_heads
    return net, params


def ours(net: sycoca.SyCoCa, params: Any, out: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """Our image/text embeddings, image tokens and teacher-forced logits on the fixture inputs.
    open_clip's text (B, L) is our token array (B, L + 1) less its extra pad column."""
    text = np.asarray(out["text"], np.int32)
    tokens = jnp.asarray(np.pad(text, ((0, 0), (0, 1)), constant_values=net.pad_id))
    images = jnp.asarray(out["images"])

    @jax.jit
    def run(params):
        def forward(m):
            image = m.encode_image(images)
            logits, _ = m.caption_logits(image["image_tokens"], tokens)
            return image, m.encode_text(tokens)["embedding"], logits

        return net.apply({"params": params}, method=forward)

    image, text_embedding, logits = run(params)
    return dict(
        image_embedding=image["embedding"],
        text_embedding=text_embedding,
        image_tokens=image["image_tokens"],
        # open_clip predicts text[:, 1:] from text[:, :-1]: our last position predicts the pad
        # column we added, which it has no counterpart for.
        logits=logits[:, : text.shape[1] - 1],
    )


def greedy(
    net: sycoca.SyCoCa, params: Any, out: dict[str, np.ndarray], settings: dict
) -> np.ndarray:
    """Our greedy captions in the layout of open_clip's ``generate(seq_len=S, min_seq_len=m)``:
    that generates at most S - 1 tokens, the last a forced end token, and bans the end token
    before m - 1 tokens; ours with ``max_len=S - 2`` and ``min_len=m - 1``, plus the forced end
    (or a pad where the caption ended), must give the same ids."""
    image_tokens = net.apply(
        {"params": params}, jnp.asarray(out["images"]), method=sycoca.SyCoCa.encode_image
    )["image_tokens"]
    captions = decoding.generate(
        net,
        params,
        image_tokens,
        method="greedy",
        max_len=settings["seq_len"] - 2,
        min_len=settings["min_seq_len"] - 1,
    )
    tokens = np.asarray(captions.tokens)
    unfinished = ~(tokens == net.eos_id).any(axis=1)
    end = np.where(unfinished, net.eos_id, net.pad_id)[:, None]
    return np.concatenate([tokens, end], axis=1)


def max_diff(a: Any, b: Any) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))
