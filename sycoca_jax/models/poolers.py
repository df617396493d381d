"""CoCa's attentional pooler: learned queries cross-attending to a token sequence."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from sycoca_jax.models.layers import MultiHeadAttention, layer_norm, logical_init

Dtype = Any
Array = jax.Array


class AttentionalPooler(nn.Module):
    """Learned queries cross-attending to a token sequence (CoCa's pooler).

    ``query_norm`` LayerNorms the learned queries before they attend (open_clip's ``ln_q``).
    ``single_token`` gives, for every input token, what the pooler outputs when that token is the
    only one it sees (softmax over one key is 1): the token's value path through the pooler. The
    relevance scores use it to place patches in the contrastive space whatever the pooler layout.
    """

    num_queries: int
    width: int
    num_heads: int
    dtype: Dtype = jnp.float32
    attention_impl: str = "xla"
    layer_norm_epsilon: float = 1e-6
    query_norm: bool = False

    def setup(self):
        self.queries = self.param(
            "queries",
            logical_init(nn.initializers.normal(0.02), ("queries", "embed")),
            (self.num_queries, self.width),
            jnp.float32,
        )
        if self.query_norm:
            self.ln_queries = layer_norm(self.dtype, epsilon=self.layer_norm_epsilon)
        self.ln_context = layer_norm(self.dtype, epsilon=self.layer_norm_epsilon)
        self.attention = MultiHeadAttention(
            self.num_heads,
            out_features=self.width,
            cross=True,
            dtype=self.dtype,
            attention_impl=self.attention_impl,
        )
        self.ln_out = layer_norm(self.dtype, epsilon=self.layer_norm_epsilon)

    def __call__(self, tokens: Array, mask: Array | None = None) -> Array:
        context = self.ln_context(tokens)
        queries = self.queries.astype(self.dtype)
        if self.query_norm:
            queries = self.ln_queries(queries)
        queries = jnp.broadcast_to(queries, (tokens.shape[0], self.num_queries, self.width))
        out = self.attention(queries, context, mask=mask)
        return self.ln_out(out)

    def single_token(self, tokens: Array) -> Array:
        """(B, N, D_in) -> (B, N, width): each token pooled on its own."""
        context = self.ln_context(tokens)
        return self.ln_out(self.attention(context, context, value_only=True))
