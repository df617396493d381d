"""Vision Transformer image encoder that can encode all patches or a gathered subset of them.

Encoding a subset (MAE/FLIP style) is how the captioning and TG-MIM branches see only the patches
the attentive masking picked: each kept patch keeps its own position embedding, and the
sequence is shorter, so the cost falls with the mask ratio.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from sycoca_jax.models import layers, pixels

Array = jax.Array

VIT_VARIANTS: dict[str, dict[str, int]] = {
    # name: width, depth, heads, mlp_dim (ViT paper / big_vision sizes)
    "Ti": dict(width=192, depth=12, num_heads=3, mlp_dim=768),
    "S": dict(width=384, depth=12, num_heads=6, mlp_dim=1536),
    "B": dict(width=768, depth=12, num_heads=12, mlp_dim=3072),
    "L": dict(width=1024, depth=24, num_heads=16, mlp_dim=4096),
    "H": dict(width=1280, depth=32, num_heads=16, mlp_dim=5120),
}


def decode_variant(variant: str) -> dict[str, int]:
    """``"B/16"`` -> width, depth, heads, mlp_dim and patch_size."""
    try:
        name, patch = variant.split("/")
        return {**VIT_VARIANTS[name], "patch_size": int(patch)}
    except (KeyError, ValueError):
        raise ValueError(
            f"unknown ViT variant {variant!r}; expected <size>/<patch> with size in "
            f"{sorted(VIT_VARIANTS)}, e.g. 'B/16'"
        ) from None


def patchify(images: Array, patch_size: int) -> Array:
    """(B, H, W, C) -> (B, N, p*p*C), patches in row-major grid order, pixels (y, x, c) inside."""
    b, h, w, c = images.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"image size {h}x{w} is not divisible by the patch size {p}")
    x = images.reshape(b, h // p, p, w // p, p, c)
    x = x.transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(patches: Array, patch_size: int, grid: tuple[int, int], channels: int = 3) -> Array:
    """Inverse of ``patchify``: (B, N, p*p*C) -> (B, H, W, C)."""
    b = patches.shape[0]
    gh, gw = grid
    p = patch_size
    x = patches.reshape(b, gh, gw, p, p, channels).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, gh * p, gw * p, channels)


def sincos_2d(grid: tuple[int, int], width: int, temperature: float = 10_000.0) -> np.ndarray:
    """Fixed 2-D sine-cosine position embeddings, (gh*gw, width) (MoCo v3 / MAE layout)."""
    if width % 4:
        raise ValueError(f"sincos2d position embeddings need a width divisible by 4, got {width}")
    gh, gw = grid
    y, x = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
    omega = 1.0 / temperature ** (np.arange(width // 4) / (width // 4 - 1 if width > 4 else 1))
    y = y.reshape(-1)[:, None] * omega[None, :]
    x = x.reshape(-1)[:, None] * omega[None, :]
    return np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1).astype(np.float32)


def gather_tokens(x: Array, indices: Array) -> Array:
    """x (B, N, ...) gathered at indices (B, K) along axis 1 -> (B, K, ...)."""
    idx = indices.reshape(indices.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, idx, axis=1)


class PositionEmbedding(nn.Module):
    """Learned (``learn``) or fixed 2-D sine-cosine (``sincos2d``) embeddings for a patch grid,
    after ``prefix`` slots for tokens before the patches (a class token); a fixed embedding
    gives those slots zeros, as open_clip does."""

    grid: tuple[int, int]
    width: int
    kind: str = "learn"
    prefix: int = 0

    @nn.compact
    def __call__(self) -> Array:
        n = self.grid[0] * self.grid[1]
        if self.kind == "learn":
            return self.param(
                "pos_embedding",
                layers.logical_init(nn.initializers.normal(0.02), ("patch_len", "embed")),
                (self.prefix + n, self.width),
                jnp.float32,
            )
        if self.kind == "sincos2d":
            fixed = sincos_2d(self.grid, self.width)
            return jnp.asarray(np.concatenate([np.zeros((self.prefix, self.width)), fixed]))
        raise ValueError(f"posemb must be 'learn' or 'sincos2d', got {self.kind!r}")


class ViT(nn.Module):
    """ViT: patch embedding, position embedding, pre-LN blocks, final LN.

    ``__call__(images, patch_indices)``: with ``patch_indices`` (B, K) only those K patches (and
    their position embeddings) are encoded; K is static under ``jit``.

    open_clip's ViT options: ``class_token`` puts a learned token with its own position slot
    before the patches (output ``(B, 1 + N, D)``, the class token first; it is encoded whatever
    ``patch_indices`` keeps); ``pre_norm`` LayerNorms the embedded tokens before the blocks
    (``ln_pre``); ``final_norm=False`` leaves the last LayerNorm to whatever follows (open_clip's
    attentional-pool CoCa normalises after its pooler); ``patch_bias=False`` is its bias-free patch
    convolution.
    """

    image_size: int
    patch_size: int
    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    posemb: str = "learn"
    dtype: jnp.dtype = jnp.float32
    attention_impl: str = "xla"
    scan: bool = False
    scan_unroll: int = 1
    remat: str = "none"
    layer_norm_epsilon: float = 1e-6
    gelu_approximate: bool = True
    class_token: bool = False
    pre_norm: bool = False
    final_norm: bool = True
    patch_bias: bool = True

    @property
    def grid(self) -> tuple[int, int]:
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}"
            )
        n = self.image_size // self.patch_size
        return (n, n)

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patches in the output: 1 with a class token, else 0."""
        return int(self.class_token)

    @nn.compact
    def __call__(self, images: Array, patch_indices: Array | None = None) -> Array:
        if images.shape[1:3] != (self.image_size, self.image_size):
            raise ValueError(
                f"expected {self.image_size}x{self.image_size} images, got {images.shape[1:3]}"
            )
        images = pixels.normalize(images)  # uint8 pixels from the pipelines; floats pass
        patches = patchify(images.astype(self.dtype), self.patch_size)
        prefix = self.num_prefix_tokens
        pos = PositionEmbedding(self.grid, self.width, self.posemb, prefix, name="posemb")()
        pos_prefix, pos = pos[:prefix], pos[prefix:]
        pos = jnp.broadcast_to(pos, (patches.shape[0],) + pos.shape)
        if patch_indices is not None:
            patches = gather_tokens(patches, patch_indices)
            pos = gather_tokens(pos, patch_indices)
        x = nn.Dense(
            self.width,
            use_bias=self.patch_bias,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            kernel_init=layers.logical_init(nn.initializers.lecun_normal(), ("patch", "embed")),
            bias_init=layers.logical_init(nn.initializers.zeros, ("embed",)),
            name="patch_embedding",
        )(patches)
        x = x + pos.astype(self.dtype)
        if self.class_token:
            cls = self.param(
                "class_embedding",
                layers.logical_init(nn.initializers.normal(0.02), ("embed",)),
                (self.width,),
                jnp.float32,
            )
            cls = (cls + pos_prefix[0]).astype(self.dtype)
            x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, self.width)), x], axis=1)
        norm = dict(dtype=self.dtype, epsilon=self.layer_norm_epsilon)
        if self.pre_norm:
            x = layers.layer_norm(name="ln_pre", **norm)(x)
        x = layers.BlockStack(
            depth=self.depth,
            num_heads=self.num_heads,
            mlp_dim=self.mlp_dim,
            dtype=self.dtype,
            attention_impl=self.attention_impl,
            scan=self.scan,
            scan_unroll=self.scan_unroll,
            remat=self.remat,
            layer_norm_epsilon=self.layer_norm_epsilon,
            gelu_approximate=self.gelu_approximate,
            name="encoder",
        )(x)
        return layers.layer_norm(name="ln_final", **norm)(x) if self.final_norm else x
