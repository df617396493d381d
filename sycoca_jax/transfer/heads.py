"""New task heads (CoCa App. A/B): a single-query attentional pooler + a linear classifier.

Classification puts it over the image encoder's patch states; VQA over the multimodal decoder's
token states (pad positions masked out), classifying over the answer vocabulary. The classifier
starts at zero, so every head begins at the uniform prediction.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from sycoca_jax.models import layers, poolers

Array = jax.Array


class PooledClassifier(nn.Module):
    """tokens (B, T, D) [+ valid (B, T)] -> logits (B, num_classes), float32."""

    num_classes: int
    width: int
    num_heads: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, tokens: Array, valid: Array | None = None) -> Array:
        mask = None if valid is None else layers.key_padding_mask(valid)
        pooled = poolers.AttentionalPooler(
            1, self.width, self.num_heads, dtype=jnp.dtype(self.dtype), name="pooler"
        )(tokens, mask)[:, 0]
        logits = nn.Dense(
            self.num_classes,
            dtype=jnp.dtype(self.dtype),
            param_dtype=jnp.float32,
            kernel_init=layers.logical_init(nn.initializers.zeros, ("embed", "classes")),
            bias_init=layers.logical_init(nn.initializers.zeros, ("classes",)),
            name="classifier",
        )(pooled)
        return logits.astype(jnp.float32)
