"""Building a ``SyCoCa`` from a config, and what tools read off one without running it.

Apart from ``sycoca.py`` so the module keeps to the model itself: config field mapping (with the
deprecated spellings), parameter shapes and counts, and the empty KV cache for decoding.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from absl import logging
from flax import linen as nn

from sycoca_jax.models.sycoca import SyCoCa


def init_decode_cache(model: SyCoCa, batch_size: int) -> Any:
    """A zero KV cache for ``batch_size`` captions of up to ``max_text_len`` tokens."""
    decoder = model.clone(decode=True)
    tokens = jnp.zeros((batch_size, model.max_text_len), jnp.int32)
    image_tokens = jnp.zeros(
        (batch_size, model.num_image_tokens, model.text_width), jnp.dtype(model.dtype)
    )

    def create():
        return decoder.init(jax.random.key(0), image_tokens, tokens, method=SyCoCa.decode_step)

    shapes = jax.eval_shape(create)["cache"]
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


# Old spellings of model fields -> their names now (kept for one release; configs saved in
# checkpoints before the rename still load).
RENAMED_FIELDS = {"ic_masking": "caption_masking", "ic_keep_ratio": "caption_keep_ratio"}


def model_fields(model_config: Any) -> dict[str, Any]:
    """``config.model`` as SyCoCa's fields: old spellings (``RENAMED_FIELDS``) mapped to the new
    ones with a deprecation warning (unset aliases dropped), unknown fields an error."""
    fields = dict(model_config.items())
    for old, new in RENAMED_FIELDS.items():
        value = fields.pop(old, None)
        if value is None:
            continue
        logging.warning(
            "model.%s is deprecated; use model.%s (removed in the next release)", old, new
        )
        fields[new] = value
    known = set(SyCoCa.__dataclass_fields__) - {"parent", "name"}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"unknown model config fields {unknown}; SyCoCa has {sorted(known)}")
    return fields


def from_config(model_config: Any) -> SyCoCa:
    """``SyCoCa(**config.model)`` (see ``model_fields``)."""
    return SyCoCa(**model_fields(model_config))


# Top-level parameter collections -> the parts reported by tools (summary, inspect_checkpoint).
PARAM_PARTS = {
    "image_encoder": "image_encoder",
    "text_encoder": "text_encoder",
    "multimodal_decoder": "multimodal_decoder",
    "caption_pooler": "poolers",
    "contrastive_pooler": "poolers",
    "image_projection": "heads",
    "text_projection": "heads",
    "log_temperature": "heads",
    "tgmim_decoder": "tgmim_decoder",
}


def param_counts(params: Any) -> dict[str, int]:
    """Parameter counts per part and ``total``, from real arrays or ``ShapeDtypeStruct``s."""
    import numpy as np

    counts = {part: 0 for part in dict.fromkeys(PARAM_PARTS.values())}
    for name, subtree in params.items():
        part = PARAM_PARTS.get(name, name)
        leaves = jax.tree.leaves(subtree)
        counts[part] = counts.get(part, 0) + sum(int(np.prod(x.shape)) for x in leaves)
    counts["total"] = sum(counts.values())
    return counts


def abstract_params(model: SyCoCa, batch_size: int = 1, boxed: bool = False) -> Any:
    """Parameter shapes (``ShapeDtypeStruct``s) without allocating anything; ``boxed`` keeps the
    ``nn.Partitioned`` boxes that carry the logical axis names."""
    images = jax.ShapeDtypeStruct((batch_size, model.image_size, model.image_size, 3), jnp.float32)
    tokens = jax.ShapeDtypeStruct((batch_size, model.max_text_len + 1), jnp.int32)
    rngs = {"params": jax.random.key(0), "masking": jax.random.key(1)}
    variables = jax.eval_shape(lambda i, t: model.init(rngs, i, t), images, tokens)
    return variables["params"] if boxed else nn.unbox(variables["params"])
