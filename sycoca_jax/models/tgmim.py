"""Text-guided masked image modelling (TG-MIM) decoder.

A light MAE-style decoder: the encoded visible patches are projected to the decoder width and put
back at their grid positions, a learned mask token fills the masked positions, position embeddings
are added, and every block cross-attends to the caption's token states, so the text has to explain
the (most caption-relevant) patches that were hidden. ``text_guided=False`` drops the
cross-attention: plain MIM, for the paper's ablation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from sycoca_jax.models import layers
from sycoca_jax.models.vit import PositionEmbedding, patchify

Array = jax.Array


def normalized_patch_targets(images: Array, patch_size: int, normalize: bool = True) -> Array:
    """Pixel targets per patch (B, N, p*p*C), float32; MAE's ``norm_pix_loss`` when normalize."""
    target = patchify(images.astype(jnp.float32), patch_size)
    if not normalize:
        return target
    mean = jnp.mean(target, axis=-1, keepdims=True)
    var = jnp.var(target, axis=-1, keepdims=True)
    return (target - mean) * jax.lax.rsqrt(var + 1e-6)


def scatter_tokens(base: jax.Array, indices: jax.Array, tokens: jax.Array) -> jax.Array:
    """Write tokens (B, K, D) into base (B, N, D) at positions indices (B, K)."""
    return jax.vmap(lambda b, i, t: b.at[i].set(t))(base, indices, tokens)


class TGMIMDecoder(nn.Module):
    """(visible tokens, their indices, text states) -> pixel predictions for every patch."""

    grid: tuple[int, int]
    patch_dim: int
    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    text_guided: bool = True
    posemb: str = "learn"
    dtype: jnp.dtype = jnp.float32
    attention_impl: str = "xla"
    scan: bool = False
    scan_unroll: int = 1
    remat: str = "none"
    layer_norm_epsilon: float = 1e-6
    gelu_approximate: bool = True

    @nn.compact
    def __call__(
        self,
        visible_tokens: jax.Array,
        visible_indices: jax.Array,
        text_states: jax.Array | None = None,
        text_valid: jax.Array | None = None,
    ) -> jax.Array:
        """visible_tokens (B, K, D_img), visible_indices (B, K), text_states (B, T, D_txt),
        text_valid (B, T) -> (B, N, patch_dim)."""
        if self.text_guided and text_states is None:
            raise ValueError("a text-guided MIM decoder needs the text token states")
        b = visible_tokens.shape[0]
        n = self.grid[0] * self.grid[1]
        x = nn.Dense(
            self.width,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            kernel_init=layers.logical_init(nn.initializers.xavier_uniform(), ("embed", "proj")),
            bias_init=layers.logical_init(nn.initializers.zeros, ("proj",)),
            name="input_projection",
        )(visible_tokens)
        mask_token = self.param(
            "mask_token",
            layers.logical_init(nn.initializers.normal(0.02), ("embed",)),
            (self.width,),
            jnp.float32,
        )
        full = jnp.broadcast_to(mask_token.astype(self.dtype), (b, n, self.width))
        full = scatter_tokens(full, visible_indices, x)
        full = full + PositionEmbedding(self.grid, self.width, self.posemb, name="posemb")().astype(
            self.dtype
        )
        context, context_mask = None, None
        if self.text_guided:
            context = text_states.astype(self.dtype)
            if text_valid is not None:
                context_mask = layers.key_padding_mask(text_valid)
        x = layers.BlockStack(
            depth=self.depth,
            num_heads=self.num_heads,
            mlp_dim=self.mlp_dim,
            cross_attention=self.text_guided,
            dtype=self.dtype,
            attention_impl=self.attention_impl,
            scan=self.scan,
            scan_unroll=self.scan_unroll,
            remat=self.remat,
            layer_norm_epsilon=self.layer_norm_epsilon,
            gelu_approximate=self.gelu_approximate,
            name="decoder",
        )(full, None, context, context_mask)
        x = layers.layer_norm(self.dtype, "ln_final", self.layer_norm_epsilon)(x)
        return nn.Dense(
            self.patch_dim,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            kernel_init=layers.logical_init(nn.initializers.xavier_uniform(), ("embed", "patch")),
            bias_init=layers.logical_init(nn.initializers.zeros, ("patch",)),
            name="pixel_head",
        )(x)
