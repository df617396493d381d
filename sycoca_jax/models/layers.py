"""Building blocks shared by every tower: attention (with a KV cache), MLP, pre-LN blocks.

Parameters carry logical axis names (``embed``, ``mlp``, ``heads``, ``kv``, ``layers``...) so one
rule table decides how the whole model is sharded; activations are constrained at block boundaries
with ``act_batch``/``act_len``/``act_embed``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.ad_checkpoint import checkpoint_name

from sycoca_jax.models.attention import AttentionMask as AttentionMask
from sycoca_jax.models.attention import causal_mask as causal_mask
from sycoca_jax.models.attention import dot_product_attention as dot_product_attention
from sycoca_jax.models.attention import key_padding_mask as key_padding_mask
from sycoca_jax.models.attention import pad_stack_to_even
from sycoca_jax.models.remat import ATTENTION_INPUTS, MLP_ACTIVATION, remat_policy

Dtype = Any
Array = jax.Array


def l2_normalize(x: Array) -> Array:
    """Unit vectors along the last axis, in float32 (the epsilon keeps a zero vector finite)."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + 1e-12)


def logical_init(init: Callable, names: tuple[str | None, ...]) -> Callable:
    """An initialiser whose parameter carries logical axis names for sharding."""
    return nn.with_logical_partitioning(init, names)


def constrain(x: Array, names: tuple[str | None, ...]) -> Array:
    """Logical sharding constraint on an activation (a no-op outside a mesh)."""
    return nn.with_logical_constraint(x, names)


LAYER_LAYOUTS = ("fused", "open_clip")


class TokenLayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` over the last axis, applied to all tokens as one (tokens, width) matrix.

    Same parameters and numbers. On (B, T, D) activations XLA's GPU compiler laid the unrolled
    layers' residual stream out batch-minor (for the scale and bias gradients' reductions over
    B and T) and transposed it back around the matrix products: 17 GB per B/32 step compiled
    for an H200, gone with the flat view (125.6 -> 110.4 GB outside matrix products)."""

    def __call__(self, x: Array) -> Array:  # type: ignore[override]
        return super().__call__(x.reshape(-1, x.shape[-1])).reshape(x.shape)


def layer_norm(dtype: Dtype, name: str | None = None, epsilon: float = 1e-6) -> nn.LayerNorm:
    """A LayerNorm with float32 parameters; ``epsilon`` 1e-6 (ours) or 1e-5 (open_clip, torch)."""
    return TokenLayerNorm(
        epsilon=epsilon,
        dtype=dtype,
        param_dtype=jnp.float32,
        scale_init=logical_init(nn.initializers.ones, ("embed",)),
        bias_init=logical_init(nn.initializers.zeros, ("embed",)),
        name=name,
    )


class HeadProjection(nn.Module):
    """``x (..., D_in) -> (..., heads, head_dim)`` or, with ``to_heads=False``,
    ``(..., heads, head_dim) -> (..., D_out)``. (Written out rather than ``nn.DenseGeneral``,
    whose kernel reshape applies a 3-name logical constraint to a 2-D array under a mesh.)

    The product runs on the flattened ``heads·head_dim`` axis, so the bias is a vector added to a
    plain matrix product: XLA's GPU compiler then folds it into the cuBLAS call, where a
    ``(heads, head_dim)`` bias broadcast after the product cost a separate kernel that re-read and
    re-wrote the queries, keys and values. The parameters keep their per-head shapes. Queries,
    keys and values carry the name ``ATTENTION_INPUTS`` for the ``dots_attention`` policies."""

    features: tuple[int, ...]
    to_heads: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        if self.to_heads:  # (D, H, K): fan-in D, fan-out H·K
            shape = (x.shape[-1], *self.features)
            names, bias_names = ("embed", "heads", "kv"), ("heads", "kv")
            init = nn.initializers.xavier_uniform(in_axis=0, out_axis=(1, 2))
        else:  # (H, K, D): fan-in H·K, fan-out D
            shape = (*x.shape[-2:], *self.features)
            names, bias_names = ("heads", "kv", "embed"), ("embed",)
            init = nn.initializers.xavier_uniform(in_axis=(0, 1), out_axis=2)
        kernel = self.param("kernel", logical_init(init, names), shape, jnp.float32)
        bias = self.param(
            "bias", logical_init(nn.initializers.zeros, bias_names), self.features, jnp.float32
        )
        fan_in = shape[0] if self.to_heads else shape[0] * shape[1]
        leading = x.shape[:-1] if self.to_heads else x.shape[:-2]
        flat = x.reshape(*leading, fan_in).astype(self.dtype)
        y = flat @ kernel.reshape(fan_in, -1).astype(self.dtype)
        y = (y + bias.reshape(-1).astype(self.dtype)).reshape(*leading, *self.features)
        return checkpoint_name(y, ATTENTION_INPUTS) if self.to_heads else y


class MultiHeadAttention(nn.Module):
    """Multi-head attention; self-attention when ``inputs_kv`` is None.

    With ``decode=True``:
    - self-attention appends this chunk's keys/values to a cache (``cache`` collection) and the
      chunk attends causally to everything cached so far;
    - cross-attention stores the context's keys/values the first time it is given a context, and
      reads them back when later calls pass ``inputs_kv=None`` (so image tokens are projected once
      per generated caption, not once per token).
    The cache is created by one pass on full-length inputs (``build.init_decode_cache``).
    """

    num_heads: int
    head_dim: int | None = None
    out_features: int | None = None
    cross: bool = False
    dtype: Dtype = jnp.float32
    attention_impl: str = "xla"
    decode: bool = False

    @nn.compact
    def __call__(
        self,
        inputs_q: Array,
        inputs_kv: Array | None = None,
        mask: Array | None = None,
        value_only: bool = False,
    ) -> Array:
        """``value_only``: skip the softmax and return each key token's value path
        (``out(value(x_kv))``, one output per key), i.e. attention over that token alone."""
        out_features = self.out_features or inputs_q.shape[-1]
        if self.head_dim is None and out_features % self.num_heads:
            raise ValueError(f"width {out_features} is not divisible by {self.num_heads} heads")
        head_dim = self.head_dim or out_features // self.num_heads

        def proj(name: str) -> HeadProjection:
            return HeadProjection((self.num_heads, head_dim), dtype=self.dtype, name=name)

        if not self.cross:
            inputs_kv = inputs_q
        if value_only:
            out = proj("value")(inputs_kv)
        else:
            query = proj("query")(inputs_q)
            if self.decode and self.cross:
                key, value = self._cached_context(proj, inputs_kv)
            else:
                if inputs_kv is None:
                    raise ValueError("cross-attention needs a context (inputs_kv)")
                key, value = proj("key")(inputs_kv), proj("value")(inputs_kv)
            if self.decode and not self.cross:
                key, value, mask = self._update_cache(key, value)
            out = dot_product_attention(query, key, value, mask, self.attention_impl)
        return HeadProjection((out_features,), to_heads=False, dtype=self.dtype, name="out")(out)

    def _cached_context(self, proj: Callable, context: Array | None) -> tuple[Array, Array]:
        if context is None:
            if not self.has_variable("cache", "context_key"):
                raise ValueError("decoding without a context needs a cache filled by a first step")
            cache = self.variables["cache"]
            return cache["context_key"], cache["context_value"]
        key, value = proj("key")(context), proj("value")(context)
        self.put_variable("cache", "context_key", key)
        self.put_variable("cache", "context_value", value)
        return key, value

    def _update_cache(self, key: Array, value: Array) -> tuple[Array, Array, Array]:
        initialized = self.has_variable("cache", "cached_key")
        cached_key = self.variable("cache", "cached_key", jnp.zeros, key.shape, key.dtype)
        cached_value = self.variable("cache", "cached_value", jnp.zeros, value.shape, value.dtype)
        index = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
        if not initialized:
            # Creation pass: the full-length input only fixes the cache shape.
            return key, value, causal_mask(key.shape[1])[None, None]
        chunk = key.shape[1]
        max_len = cached_key.value.shape[1]
        start = index.value
        cached_key.value = jax.lax.dynamic_update_slice(cached_key.value, key, (0, start, 0, 0))
        cached_value.value = jax.lax.dynamic_update_slice(
            cached_value.value, value, (0, start, 0, 0)
        )
        index.value = start + chunk
        query_pos = start + jnp.arange(chunk)
        mask = jnp.arange(max_len)[None, :] <= query_pos[:, None]
        return cached_key.value, cached_value.value, mask[None, None]


class Mlp(nn.Module):
    """Two-layer GELU MLP; ``gelu_approximate`` picks the tanh approximation (ours) or the exact
    erf GELU (open_clip, ``torch.nn.GELU``)."""

    hidden_dim: int
    dtype: Dtype = jnp.float32
    gelu_approximate: bool = True

    @nn.compact
    def __call__(self, x: Array) -> Array:
        width = x.shape[-1]
        h = nn.Dense(
            self.hidden_dim,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            kernel_init=logical_init(nn.initializers.xavier_uniform(), ("embed", "mlp")),
            bias_init=logical_init(nn.initializers.normal(1e-6), ("mlp",)),
            name="fc1",
        )(x)
        h = checkpoint_name(nn.gelu(h, approximate=self.gelu_approximate), MLP_ACTIVATION)
        h = constrain(h, ("act_batch", "act_len", "act_mlp"))
        return nn.Dense(
            width,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            kernel_init=logical_init(nn.initializers.xavier_uniform(), ("mlp", "embed")),
            bias_init=logical_init(nn.initializers.normal(1e-6), ("embed",)),
            name="fc2",
        )(h)


class Block(nn.Module):
    """Pre-LN transformer block: self-attention, optional cross-attention, MLP.

    ``layout`` (with cross-attention): ``fused`` is one block with both attentions and one MLP;
    ``open_clip`` is open_clip's multimodal layer, a self-attention block with its own MLP then a
    cross-attention block with its own MLP and a LayerNorm of its own on the context
    (``ln_context``). ``scanned=True`` makes the call signature ``(carry, None)``-shaped for
    ``nn.scan``.
    """

    num_heads: int
    mlp_dim: int
    cross_attention: bool = False
    dtype: Dtype = jnp.float32
    attention_impl: str = "xla"
    decode: bool = False
    scanned: bool = False
    layer_norm_epsilon: float = 1e-6
    gelu_approximate: bool = True
    layout: str = "fused"

    def _norm(self, name: str) -> nn.LayerNorm:
        return layer_norm(self.dtype, name, self.layer_norm_epsilon)

    def _mlp(self, x: Array, norm: str, name: str) -> Array:
        y = self._norm(norm)(x)
        return x + Mlp(
            self.mlp_dim, dtype=self.dtype, gelu_approximate=self.gelu_approximate, name=name
        )(y)

    def _attention(self, name: str, cross: bool = False) -> MultiHeadAttention:
        return MultiHeadAttention(
            self.num_heads,
            cross=cross,
            dtype=self.dtype,
            attention_impl=self.attention_impl,
            decode=self.decode,
            name=name,
        )

    @nn.compact
    def __call__(
        self,
        x: Array,
        mask: Array | None = None,
        context: Array | None = None,
        context_mask: Array | None = None,
    ):
        if self.layout not in LAYER_LAYOUTS:
            raise ValueError(f"layer layout must be one of {LAYER_LAYOUTS}, got {self.layout!r}")
        x = constrain(x, ("act_batch", "act_len", "act_embed"))
        y = self._norm("ln_self")(x)
        x = x + self._attention("self_attention")(y, mask=mask)
        split = self.cross_attention and self.layout == "open_clip"
        if split:
            x = self._mlp(x, "ln_mlp", "mlp")
        if self.cross_attention:
            y = self._norm("ln_cross")(x)
            if split and context is not None:  # None: decoding reads the cached context
                context = self._norm("ln_context")(context)
            x = x + self._attention("cross_attention", cross=True)(y, context, mask=context_mask)
        x = self._mlp(x, "ln_cross_mlp", "cross_mlp") if split else self._mlp(x, "ln_mlp", "mlp")
        x = constrain(x, ("act_batch", "act_len", "act_embed"))
        return (x, None) if self.scanned else x


def scan_unroll(depth: int, layers: int) -> int:
    """``nn.scan``'s ``unroll`` for ``model.scan_unroll``: 0 is the whole depth."""
    if isinstance(layers, bool) or not isinstance(layers, int) or layers < 0:
        raise ValueError(
            f"scan_unroll must be 0 (no loop) or a number of layers per loop iteration, "
            f"got {layers!r}"
        )
    return min(layers or depth, depth)


class BlockStack(nn.Module):
    """``depth`` blocks, either unrolled (``block_i``) or as one ``nn.scan`` (params stacked on a
    leading ``layers`` axis), each optionally rematerialised. Scanning keeps compile time flat in
    depth; unrolled params are easier to read. The two compute the same function. With cuDNN
    attention, odd lengths are padded once here rather than in every layer
    (``attention.pad_stack_to_even``).

    ``scan_unroll`` sets how many layers one iteration of the scan's loop runs (``nn.scan``'s
    ``unroll``); 0 means all of them: no loop at all, the parameters still stacked. Without the
    loop XLA's GPU compiler writes each layer's activations where the backward pass reads them
    instead of copying them into stacked buffers, and the optimiser still updates one array per
    stacked weight rather than one per layer."""

    depth: int
    num_heads: int
    mlp_dim: int
    cross_attention: bool = False
    dtype: Dtype = jnp.float32
    attention_impl: str = "xla"
    decode: bool = False
    scan: bool = False
    scan_unroll: int = 1
    remat: str = "none"
    layer_norm_epsilon: float = 1e-6
    gelu_approximate: bool = True
    layout: str = "fused"

    @nn.compact
    def __call__(
        self,
        x: Array,
        mask: Array | None = None,
        context: Array | None = None,
        context_mask: Array | None = None,
    ) -> Array:
        unroll = scan_unroll(self.depth, self.scan_unroll)
        block_cls = Block
        if self.remat != "none":
            policy = remat_policy(self.remat)
            # Only a loop keeps XLA from merging the backward pass's recomputation with the
            # forward pass (which would keep the activations remat was asked to drop): layers
            # outside one (unrolled, or the remainder of an uneven unroll) need the barrier.
            looped = self.scan and unroll < self.depth and self.depth % unroll == 0
            block_cls = nn.remat(block_cls, policy=policy, prevent_cse=not looped)
        kwargs = dict(
            num_heads=self.num_heads,
            mlp_dim=self.mlp_dim,
            cross_attention=self.cross_attention,
            dtype=self.dtype,
            attention_impl=self.attention_impl,
            decode=self.decode,
            layer_norm_epsilon=self.layer_norm_epsilon,
            gelu_approximate=self.gelu_approximate,
            layout=self.layout,
        )
        length = x.shape[1]
        if self.attention_impl == "cudnn" and not self.decode:
            x, mask, context, context_mask = pad_stack_to_even(x, mask, context, context_mask)
        if self.scan:
            scanned = nn.scan(
                block_cls,
                variable_axes={"params": 0, "cache": 0},
                split_rngs={"params": True},
                in_axes=(nn.broadcast, nn.broadcast, nn.broadcast),
                length=self.depth,
                unroll=unroll,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            x, _ = scanned(scanned=True, name="blocks", **kwargs)(x, mask, context, context_mask)
        else:
            for i in range(self.depth):
                x = block_cls(name=f"block_{i}", **kwargs)(x, mask, context, context_mask)
        return x[:, :length]
