"""The ViT's subset path, patchify and position embeddings against independent references."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sycoca_jax.models import vit
from tests.models import reference


def test_patchify_round_trip_and_order():
    images = np.random.default_rng(0).normal(size=(2, 12, 8, 3)).astype(np.float32)
    patches = np.asarray(vit.patchify(jnp.asarray(images), 4))
    assert patches.shape == (2, 6, 48)
    np.testing.assert_array_equal(patches[1], reference.patches_by_loop(images[1], 4))
    np.testing.assert_array_equal(vit.unpatchify(jnp.asarray(patches), 4, (3, 2)), images)


def test_subset_encoding_equals_gather_then_encode(tiny_model, tiny_params, tiny_inputs):
    images, _ = tiny_inputs
    encoder = vit.ViT(
        image_size=tiny_model.image_size,
        patch_size=tiny_model.patch_size,
        width=tiny_model.image_width,
        depth=tiny_model.image_depth,
        num_heads=tiny_model.image_heads,
        mlp_dim=tiny_model.image_mlp_dim,
    )
    params = tiny_params["image_encoder"]
    rng = np.random.default_rng(3)
    n = encoder.num_patches
    indices = np.stack([rng.permutation(n)[:20] for _ in range(images.shape[0])])
    subset = encoder.apply({"params": params}, images, jnp.asarray(indices))
    full = encoder.apply({"params": params}, images)
    for b in range(images.shape[0]):
        expected = reference.vit_encode(
            np.asarray(images[b]), indices[b], params, encoder.patch_size, encoder.depth
        )
        np.testing.assert_allclose(subset[b], expected, atol=2e-4, rtol=2e-4)
    all_indices = jnp.tile(jnp.arange(n)[None], (images.shape[0], 1))
    np.testing.assert_allclose(
        encoder.apply({"params": params}, images, all_indices), full, atol=1e-5
    )


def test_sincos_posemb_is_fixed_and_distinct():
    pos = vit.sincos_2d((4, 4), 32)
    assert pos.shape == (16, 32)
    omega = 1.0 / 10_000 ** (np.arange(8) / 7)
    gy, gx = 2, 3
    expected = np.concatenate(
        [np.sin(gx * omega), np.cos(gx * omega), np.sin(gy * omega), np.cos(gy * omega)]
    )
    np.testing.assert_allclose(pos[gy * 4 + gx], expected, rtol=1e-5, atol=1e-6)
    dist = np.linalg.norm(pos[:, None] - pos[None], axis=-1)
    assert (dist[~np.eye(16, dtype=bool)] > 1e-3).all()
    model = vit.ViT(
        image_size=16, patch_size=4, width=32, depth=1, num_heads=2, mlp_dim=64, posemb="sincos2d"
    )
    params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)))["params"]
    assert "posemb" not in params


def test_variant_strings():
    assert vit.decode_variant("L/14") == dict(
        width=1024, depth=24, num_heads=16, mlp_dim=4096, patch_size=14
    )
    with pytest.raises(ValueError, match="unknown ViT variant"):
        vit.decode_variant("XL16")


def test_wrong_image_size_is_rejected(tiny_model, tiny_params):
    with pytest.raises(ValueError, match="expected 64x64 images"):
        tiny_model.apply(
            {"params": tiny_params}, jnp.zeros((1, 32, 32, 3)), method=tiny_model.encode_image
        )
