"""Text towers: the unimodal causal decoder (with CLS at the end) and the multimodal decoder.

Token layout (right padded, ``pad_id`` everywhere after the caption):
``tokens = [bos, w_1, ..., w_n, eos, pad, ...]``. ``caption_input_and_target`` is the single
place where the captioning shift happens; everything else takes its output.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from sycoca_jax.models import layers

Array = jax.Array


def caption_input_and_target(tokens: Array) -> tuple[Array, Array]:
    """The one captioning shift: input ``tokens[:, :-1]`` predicts target ``tokens[:, 1:]``.

    Data pipelines emit ``max_text_len + 1`` tokens so both halves have ``max_text_len``.
    """
    return tokens[:, :-1], tokens[:, 1:]


CLS_MASKS = ("corrected", "legacy")


def unimodal_attention_mask(valid: Array, cls_mask: str = "corrected") -> layers.AttentionMask:
    """Mask for [tokens..., CLS]: tokens attend causally; no query attends to a pad key.
    valid: (B, T); ``.dense(T+1, T+1)`` gives it as a (B, 1, T+1, T+1) array.

    ``corrected``: key j is valid when token j is not pad, and the CLS key is valid, so CLS sees
    every real token and itself. ``legacy`` is the mask open_clip's released CoCa weights were
    trained with: the validity row is shifted by one (key 0 always valid, key j valid when token
    j - 1 is not pad), so every query also sees the first pad position and CLS sees itself only
    when the text fills the context.
    """
    always = jnp.ones((valid.shape[0], 1), bool)
    if cls_mask == "corrected":
        keys_valid = jnp.concatenate([valid, always], axis=1)
    elif cls_mask == "legacy":
        keys_valid = jnp.concatenate([always, valid], axis=1)
    else:
        raise ValueError(f"cls_mask must be one of {CLS_MASKS}, got {cls_mask!r}")
    return layers.AttentionMask(key_valid=keys_valid, causal=True)


class TokenEmbedding(nn.Module):
    vocab_size: int
    width: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens: Array) -> Array:
        table = self.param(
            "embedding",
            layers.logical_init(nn.initializers.normal(0.02), ("vocab", "embed")),
            (self.vocab_size, self.width),
            jnp.float32,
        )
        # The lookup reads a copy gathered over ``fsdp`` (as every FSDP weight is for its use);
        # in the backward pass, the scatter-add into the table then stays local to each device's
        # batch rows before one reduction. Against the table's own FSDP layout, the partitioner
        # would replicate the whole batch of text states instead.
        table = layers.constrain(table, ("vocab", None))
        return jnp.take(table, tokens, axis=0).astype(self.dtype)


class TextEncoder(nn.Module):
    """Unimodal causal decoder with a learned CLS token appended after the (padded) tokens.

    Returns (token_states (B, T, D), cls_state (B, D)); the CLS state is after the final
    LayerNorm, and so are the token states unless ``normalize_token_states=False`` (open_clip
    hands its multimodal decoder the un-normalised ones). ``cls_mask``: see
    ``unimodal_attention_mask``. The CLS
    uses the last position-embedding slot whatever T is, so a shorter input embeds the same.
    With ``decode=True`` it takes a chunk of new tokens, keeps its position in the ``cache``
    collection and returns only token states (no CLS: generation needs none).
    """

    vocab_size: int
    max_len: int
    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    pad_id: int = 0
    dtype: jnp.dtype = jnp.float32
    attention_impl: str = "xla"
    scan: bool = False
    scan_unroll: int = 1
    remat: str = "none"
    decode: bool = False
    layer_norm_epsilon: float = 1e-6
    gelu_approximate: bool = True
    normalize_token_states: bool = True
    cls_mask: str = "corrected"

    @nn.compact
    def __call__(self, tokens: Array) -> tuple[Array, Array | None]:
        b, t = tokens.shape
        if t > self.max_len:
            raise ValueError(f"text of length {t} exceeds max_text_len={self.max_len}")
        x = TokenEmbedding(self.vocab_size, self.width, self.dtype, name="token_embedding")(tokens)
        pos = self.param(
            "pos_embedding",
            layers.logical_init(nn.initializers.normal(0.01), ("text_len", "embed")),
            (self.max_len + 1, self.width),
            jnp.float32,
        ).astype(self.dtype)
        stack = layers.BlockStack(
            depth=self.depth,
            num_heads=self.num_heads,
            mlp_dim=self.mlp_dim,
            dtype=self.dtype,
            attention_impl=self.attention_impl,
            decode=self.decode,
            scan=self.scan,
            scan_unroll=self.scan_unroll,
            remat=self.remat,
            layer_norm_epsilon=self.layer_norm_epsilon,
            gelu_approximate=self.gelu_approximate,
            name="decoder",
        )
        ln_final = layers.layer_norm(self.dtype, "ln_final", self.layer_norm_epsilon)

        def token_states(x: Array) -> Array:
            return ln_final(x) if self.normalize_token_states else x

        cls = self.param(
            "cls", layers.logical_init(nn.initializers.normal(0.02), ("embed",)), (self.width,)
        )
        if self.decode:
            created = self.has_variable("cache", "position")
            position = self.variable("cache", "position", lambda: jnp.zeros((), jnp.int32))
            start = position.value
            x = x + jax.lax.dynamic_slice_in_dim(pos, start, t, axis=0)[None]
            if created:  # not on the pass that only creates the cache
                position.value = start + t
            return token_states(stack(x)), None
        x = x + pos[:t][None]
        cls_token = (cls.astype(self.dtype) + pos[self.max_len])[None, None]
        cls_token = jnp.broadcast_to(cls_token, (b, 1, self.width))
        x = jnp.concatenate([x, cls_token], axis=1)
        mask = unimodal_attention_mask(tokens != self.pad_id, self.cls_mask)
        x = stack(x, mask)
        return token_states(x[:, :-1]), ln_final(x[:, -1])


class MultimodalDecoder(nn.Module):
    """Causal self-attention over the unimodal token states + cross-attention to image tokens,
    then vocabulary logits. ``layout``: ``fused`` (one block per layer, a biased vocabulary
    projection) or ``open_clip`` (its two-block layer, see ``layers.Block``, and its bias-free
    vocabulary projection)."""

    vocab_size: int
    depth: int
    num_heads: int
    mlp_dim: int
    dtype: jnp.dtype = jnp.float32
    attention_impl: str = "xla"
    scan: bool = False
    scan_unroll: int = 1
    remat: str = "none"
    decode: bool = False
    layer_norm_epsilon: float = 1e-6
    gelu_approximate: bool = True
    layout: str = "fused"

    @nn.compact
    def __call__(
        self, token_states: Array, image_tokens: Array | None, return_states: bool = False
    ) -> Array:
        """Vocabulary logits, or with ``return_states`` the final (post-LayerNorm) token states
        they are read from (for task heads such as VQA). ``image_tokens`` may be None when
        decoding after the first step (cached context)."""
        if image_tokens is not None:
            image_tokens = image_tokens.astype(self.dtype)
        mask = None if self.decode else layers.AttentionMask(causal=True)
        x = layers.BlockStack(
            depth=self.depth,
            num_heads=self.num_heads,
            mlp_dim=self.mlp_dim,
            cross_attention=True,
            dtype=self.dtype,
            attention_impl=self.attention_impl,
            decode=self.decode,
            scan=self.scan,
            scan_unroll=self.scan_unroll,
            remat=self.remat,
            layer_norm_epsilon=self.layer_norm_epsilon,
            gelu_approximate=self.gelu_approximate,
            layout=self.layout,
            name="decoder",
        )(token_states, mask, image_tokens)
        x = layers.layer_norm(self.dtype, "ln_final", self.layer_norm_epsilon)(x)
        if return_states:
            return x
        logits = nn.Dense(
            self.vocab_size,
            use_bias=self.layout != "open_clip",
            dtype=self.dtype,
            param_dtype=jnp.float32,
            kernel_init=layers.logical_init(nn.initializers.xavier_uniform(), ("embed", "vocab")),
            bias_init=layers.logical_init(nn.initializers.zeros, ("vocab",)),
            name="logits",
        )(x)
        return layers.constrain(logits, ("act_batch", "act_len", "act_vocab"))
