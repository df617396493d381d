"""SyCoCa: CoCa's contrastive and captioning heads plus a text-guided MIM head.

One training forward (``__call__``) returns everything the three losses need; ``encode_image``,
``encode_text``, ``caption_logits`` and ``decode_step`` are the inference entry points. The
forward's masked branches (captioning, TG-MIM) are in ``branches``. All token arrays are the
pipeline's ``(B, max_text_len + 1)`` arrays; the text tower reads the first ``max_text_len`` of
them (``caption_input_and_target``).

Setting ``use_tgmim=False, caption_masking="none"`` gives CoCa; also ``use_captioning=False`` gives
CLIP.

The open_clip fields (``layer_norm_epsilon`` ... ``layer_layout``) default to our architecture;
``sycoca_jax.interop.open_clip_config`` sets them to reproduce an open_clip CoCa exactly. With
``class_token`` the image encoder's states carry the class token first: it goes to the poolers
and is always encoded when a branch re-encodes a subset, but it is never a maskable patch, so
relevance scores, masks and the TG-MIM decoder cover the patches only.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from sycoca_jax.models import branches, layers, options, pixels, poolers
from sycoca_jax.models.text import MultimodalDecoder, TextEncoder, caption_input_and_target
from sycoca_jax.models.tgmim import TGMIMDecoder
from sycoca_jax.models.vit import ViT, gather_tokens

Array = jax.Array


class SyCoCa(nn.Module):
    """The full model. Every field is a plain value, so ``SyCoCa(**config.model)`` builds it."""

    # Image tower.
    image_size: int = 224
    patch_size: int = 16
    image_width: int = 768
    image_depth: int = 12
    image_heads: int = 12
    image_mlp_dim: int = 3072
    posemb: str = "learn"
    # Text towers.
    vocab_size: int = 64_000
    max_text_len: int = 76
    pad_id: int = 0
    bos_id: int = 1  # the tokenizer's special ids (checked against it where they meet)
    eos_id: int = 2
    text_width: int = 768
    text_depth: int = 12
    multimodal_depth: int = 12
    text_heads: int = 12
    text_mlp_dim: int = 3072
    # Poolers and the contrastive head.
    embed_dim: int = 512
    pooler: str = "cascade"
    caption_queries: int = 256
    pooler_heads: int = 8
    temperature_init: float = 1 / 0.07
    temperature_max: float = 100.0
    # Objectives and attentive masking.
    use_captioning: bool = True
    use_tgmim: bool = True
    score_mode: str = "max_sim"
    caption_masking: str = "attentive"
    caption_keep_ratio: float = 0.5
    tgmim_masking: str = "attentive"
    tgmim_mask_ratio: float = 0.5
    branch_encoding: str = "reencode"
    # TG-MIM decoder.
    decoder_width: int = 512
    decoder_depth: int = 4
    decoder_heads: int = 16
    decoder_mlp_dim: int = 2048
    text_guided: bool = True
    norm_pix_loss: bool = True
    # Compute.
    dtype: Any = "float32"
    attention_impl: str = "xla"
    scan: bool = False
    scan_unroll: int = 1  # layers per scan iteration; 0: no loop
    remat: str = "none"
    decode: bool = False
    # open_clip compatibility (see the module docstring).
    layer_norm_epsilon: float = 1e-6  # open_clip (torch): 1e-5
    gelu_approximate: bool = True  # tanh GELU; open_clip: exact
    class_token: bool = False  # a ViT class token with its own position slot
    pre_norm: bool = False  # a LayerNorm before the ViT blocks (open_clip's ln_pre)
    image_final_norm: bool = True  # the ViT's final LayerNorm (open_clip: after its pooler)
    patch_embedding_bias: bool = True  # open_clip's patch convolution has none
    pooler_query_norm: bool = False  # LayerNorm the pooler queries (open_clip's ln_q)
    normalize_token_states: bool = True  # LayerNorm the text states given to the decoder
    cls_mask: str = "corrected"  # or "legacy" (open_clip's released CoCa text towers)
    layer_layout: str = "fused"  # multimodal layers: "fused" or "open_clip"

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_prefix_tokens(self) -> int:
        """Image-encoder states before the patches: the class token, if any."""
        return int(self.class_token)

    @property
    def num_image_tokens(self) -> int:
        """How many image tokens the multimodal decoder cross-attends to."""
        if self.pooler == "none":
            return self.num_patches
        return self.caption_queries - 1 if self.pooler == "single" else self.caption_queries

    def setup(self):
        options.check(self)
        dtype = jnp.dtype(self.dtype)
        common = dict(dtype=dtype, attention_impl=self.attention_impl)
        stack = dict(
            scan=self.scan,
            scan_unroll=self.scan_unroll,
            remat=self.remat,
            layer_norm_epsilon=self.layer_norm_epsilon,
            gelu_approximate=self.gelu_approximate,
        )
        self.image_encoder = ViT(
            image_size=self.image_size,
            patch_size=self.patch_size,
            width=self.image_width,
            depth=self.image_depth,
            num_heads=self.image_heads,
            mlp_dim=self.image_mlp_dim,
            posemb=self.posemb,
            class_token=self.class_token,
            pre_norm=self.pre_norm,
            final_norm=self.image_final_norm,
            patch_bias=self.patch_embedding_bias,
            **common,
            **stack,
        )
        self.text_encoder = TextEncoder(
            vocab_size=self.vocab_size,
            max_len=self.max_text_len,
            width=self.text_width,
            depth=self.text_depth,
            num_heads=self.text_heads,
            mlp_dim=self.text_mlp_dim,
            pad_id=self.pad_id,
            decode=self.decode,
            normalize_token_states=self.normalize_token_states,
            cls_mask=self.cls_mask,
            **common,
            **stack,
        )
        pooler = dict(
            num_heads=self.pooler_heads,
            layer_norm_epsilon=self.layer_norm_epsilon,
            query_norm=self.pooler_query_norm,
            **common,
        )
        if self.pooler != "none":
            self.caption_pooler = poolers.AttentionalPooler(
                self.caption_queries, self.text_width, **pooler
            )
        if self.pooler in ("cascade", "parallel"):
            self.contrastive_pooler = poolers.AttentionalPooler(1, self.text_width, **pooler)

        def projection() -> nn.Dense:
            return nn.Dense(
                self.embed_dim,
                use_bias=False,
                dtype=dtype,
                param_dtype=jnp.float32,
                kernel_init=layers.logical_init(nn.initializers.lecun_normal(), ("embed", "proj")),
            )

        self.image_projection = projection()
        self.text_projection = projection()
        self.log_temperature = self.param(
            "log_temperature",
            layers.logical_init(nn.initializers.constant(math.log(self.temperature_init)), ()),
            (),
            jnp.float32,
        )
        if self.use_captioning:
            self.multimodal_decoder = MultimodalDecoder(
                vocab_size=self.vocab_size,
                depth=self.multimodal_depth,
                num_heads=self.text_heads,
                mlp_dim=self.text_mlp_dim,
                decode=self.decode,
                layout=self.layer_layout,
                **common,
                **stack,
            )
        if self.use_tgmim:
            grid = (self.image_size // self.patch_size,) * 2
            self.tgmim_decoder = TGMIMDecoder(
                grid=grid,
                patch_dim=self.patch_size * self.patch_size * 3,
                width=self.decoder_width,
                depth=self.decoder_depth,
                num_heads=self.decoder_heads,
                mlp_dim=self.decoder_mlp_dim,
                text_guided=self.text_guided,
                posemb=self.posemb,
                **common,
                **stack,
            )

    # ----------------------------------------------------------------------------- pieces
    def temperature(self) -> Array:
        """exp(log_temperature), clipped at ``temperature_max`` (CLIP's 100)."""
        return jnp.exp(jnp.minimum(self.log_temperature, math.log(self.temperature_max)))

    def _contrastive_vector(self, patch_states: Array) -> Array:
        """patch_states: the image encoder's output (class token included, if any)."""
        if self.pooler == "cascade":
            return self.contrastive_pooler(self.caption_pooler(patch_states))[:, 0]
        if self.pooler == "parallel":
            return self.contrastive_pooler(patch_states)[:, 0]
        if self.pooler == "none":
            return patch_states[:, 0]
        return self.caption_pooler(patch_states)[:, 0]

    def image_tokens(self, patch_states: Array) -> Array:
        """The tokens the multimodal decoder cross-attends to."""
        if self.pooler == "none":
            return patch_states[:, self.num_prefix_tokens :]
        pooled = self.caption_pooler(patch_states)
        return pooled[:, 1:] if self.pooler == "single" else pooled

    def patch_embeddings(self, patch_states: Array) -> Array:
        """Each patch placed in the contrastive space: the image head applied to that patch alone
        (its value path through the pooler(s), then the image projection). (B, N, embed_dim).
        patch_states: the patches only (no class token)."""
        if self.pooler == "cascade":
            x = self.contrastive_pooler.single_token(self.caption_pooler.single_token(patch_states))
        elif self.pooler == "parallel":
            x = self.contrastive_pooler.single_token(patch_states)
        elif self.pooler == "none":
            x = patch_states
        else:
            x = self.caption_pooler.single_token(patch_states)
        return self.image_projection(x)

    def patches(self, states: Array) -> Array:
        """The patch part of image-encoder states (the class token, if any, removed)."""
        return states[:, self.num_prefix_tokens :]

    def branch_states(self, images: Array, patch_states: Array | None, indices: Array) -> Array:
        """Encoder states of the patches at ``indices`` (B, K), the class token (if any) first:
        re-encoded (the class token is always encoded; ``patch_states`` may then be None) or
        gathered from ``patch_states``."""
        if self.branch_encoding == "reencode":
            return self.image_encoder(images, indices)
        prefix = patch_states[:, : self.num_prefix_tokens]
        kept = gather_tokens(self.patches(patch_states), indices)
        return jnp.concatenate([prefix, kept], axis=1)

    # ----------------------------------------------------------------------------- entry points
    def encode_image(self, images: Array) -> dict[str, Array]:
        """images (B, H, W, 3) -> embedding (B, E) unit norm, patch_states (B, P + N, D_img) (P =
        ``num_prefix_tokens``, the class token first) and,
        with a captioning head, image_tokens (B, M, D_txt) for the multimodal decoder."""
        patch_states = self.image_encoder(images)
        out = {
            "embedding": layers.l2_normalize(
                self.image_projection(self._contrastive_vector(patch_states))
            ),
            "patch_states": patch_states,
        }
        if self.use_captioning:
            out["image_tokens"] = self.image_tokens(patch_states)
        return out

    def image_embedding(self, images: Array, patch_indices: Array | None = None) -> Array:
        """The contrastive embedding (B, E) of the images, seeing only the patches at
        ``patch_indices`` (B, K) when given (e.g. to measure what leaving a patch out costs)."""
        patch_states = self.image_encoder(images, patch_indices)
        return layers.l2_normalize(self.image_projection(self._contrastive_vector(patch_states)))

    def encode_text(self, tokens: Array) -> dict[str, Array]:
        """tokens (B, max_text_len + 1) -> embedding (B, E) unit norm and token_states (B, L, D)."""
        text_input, _ = caption_input_and_target(tokens)
        token_states, cls_state = self.text_encoder(text_input)
        return {
            "embedding": layers.l2_normalize(self.text_projection(cls_state)),
            "token_states": token_states,
        }

    def caption_logits(self, image_tokens: Array, tokens: Array) -> tuple[Array, Array]:
        """Teacher-forced logits (B, L, V) and their targets (B, L)."""
        text_input, targets = caption_input_and_target(tokens)
        token_states, _ = self.text_encoder(text_input)
        return self.multimodal_decoder(token_states, image_tokens), targets

    def caption_states(self, image_tokens: Array, tokens: Array) -> tuple[Array, Array]:
        """The multimodal decoder's final token states (B, L, D) and the targets (B, L): what the
        vocabulary projection reads, for task heads (CoCa's VQA pools these)."""
        text_input, targets = caption_input_and_target(tokens)
        token_states, _ = self.text_encoder(text_input)
        states = self.multimodal_decoder(token_states, image_tokens, return_states=True)
        return states, targets

    def relevance_inputs(self, images: Array, tokens: Array) -> dict[str, Array]:
        """What attentive masking scores patches from, for measuring it: ``patch_embeddings``
        (B, N, E) and ``token_embeddings`` (B, T, E) (projected, not normalised), ``token_valid``
        (B, T) (the tokens the scores read), ``text_embedding`` (B, E) and ``temperature``.
        ``masking.relevance_scores`` of these is the training forward's ``relevance``."""
        text_input, _ = caption_input_and_target(tokens)
        token_states, cls_state = self.text_encoder(text_input)
        patch_states = self.image_encoder(images)
        return {
            "patch_embeddings": self.patch_embeddings(self.patches(patch_states)),
            "token_embeddings": self.text_projection(token_states),
            "token_valid": text_input != self.pad_id,
            "text_embedding": layers.l2_normalize(self.text_projection(cls_state)),
            "temperature": self.temperature(),
        }

    def selected_image_tokens(self, images: Array, indices: Array) -> Array:
        """The decoder's image tokens from the patches at ``indices`` (B, K) only, encoded as
        the captioning branch sees them in training (``branch_encoding``): for captioning with
        the training-time selection at inference."""
        patch_states = None if self.branch_encoding == "reencode" else self.image_encoder(images)
        return self.image_tokens(self.branch_states(images, patch_states, indices))

    def decode_step(self, image_tokens: Array | None, tokens: Array) -> Array:
        """With ``decode=True``: logits (B, t, V) for a chunk of new tokens (B, t), using and
        extending the KV cache. Pass image_tokens on the first step, None afterwards."""
        if not self.decode:
            raise ValueError("decode_step needs a model cloned with decode=True")
        token_states, _ = self.text_encoder(tokens)
        return self.multimodal_decoder(token_states, image_tokens)

    def __call__(self, images: Array, tokens: Array) -> dict[str, Array]:
        """Training forward. images (B, H, W, 3) uint8 pixels (or normalised floats), tokens
        (B, max_text_len + 1).

        Needs an rng named ``masking`` when a branch uses random masking.
        """
        images = pixels.normalize(images)  # once, for the towers and the TG-MIM targets
        text_input, targets = caption_input_and_target(tokens)
        text_valid = text_input != self.pad_id
        token_states, cls_state = self.text_encoder(text_input)
        patch_states = self.image_encoder(images)

        out: dict[str, Array] = {
            "image_embedding": layers.l2_normalize(
                self.image_projection(self._contrastive_vector(patch_states))
            ),
            "text_embedding": layers.l2_normalize(self.text_projection(cls_state)),
            "temperature": self.temperature(),
        }

        relevance = None
        if branches.needs_relevance(self):
            relevance = branches.relevance(self, patch_states, token_states, text_valid)
            out["relevance"] = relevance
        if self.use_captioning:
            out.update(
                branches.caption(self, images, patch_states, token_states, targets, relevance)
            )
        if self.use_tgmim:
            out.update(
                branches.tgmim(self, images, patch_states, token_states, text_valid, relevance)
            )
        return out
