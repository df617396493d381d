"""uint8 images are normalised on device, in the model: the same numbers as the host-side float32
normalisation they replace, the same losses, and 4× fewer bytes per batch on the wire."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sycoca_jax import losses
from sycoca_jax.models import pixels, sycoca
from tests.helpers import config_for

# CLIP's published statistics, written out independently of the module under test.
MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
STD = np.array([0.26862954, 0.26130258, 0.27577711])


def host_normalised(images: np.ndarray) -> np.ndarray:
    """What the input pipeline used to send: float32 CLIP-normalised pixels."""
    return ((images.astype(np.float64) / 255 - MEAN) / STD).astype(np.float32)


def test_normalize_matches_clip_statistics():
    images = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, axis=-1)
    out = jax.jit(pixels.normalize)(images)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), host_normalised(images), rtol=1e-6, atol=1e-6)


def test_floats_pass_through_and_other_integers_are_refused():
    floats = np.linspace(-2, 2, 12, dtype=np.float32).reshape(1, 2, 2, 3)
    assert pixels.normalize(floats) is floats
    with pytest.raises(TypeError, match="uint8"):
        pixels.normalize(np.zeros((1, 2, 2, 3), np.int32))


def test_uint8_batch_gives_the_float32_paths_losses(tiny_model, tiny_params, tiny_inputs):
    """The training forward on uint8 pixels equals the forward on host-normalised float32
    images (today's path) within float rounding, every loss term."""
    _, tokens = tiny_inputs
    rng = np.random.default_rng(3)
    size = tiny_model.image_size
    images = rng.integers(0, 256, (tokens.shape[0], size, size, 3), np.uint8)
    loss_config = config_for("tiny").loss  # ITC + 2 caption + TG-MIM

    def loss(params, image_batch):
        out = tiny_model.apply(
            {"params": params}, image_batch, tokens, rngs={"masking": jax.random.key(0)}
        )
        return losses.total_loss(out, loss_config)

    total_u8, metrics_u8 = jax.jit(loss)(tiny_params, jnp.asarray(images))
    total_f32, metrics_f32 = jax.jit(loss)(tiny_params, jnp.asarray(host_normalised(images)))
    assert set(metrics_u8) == set(metrics_f32) and "loss/tgmim" in metrics_u8
    for key in metrics_u8:
        np.testing.assert_allclose(metrics_u8[key], metrics_f32[key], rtol=1e-5, err_msg=key)
    np.testing.assert_allclose(total_u8, total_f32, rtol=1e-5)


def test_image_tower_alone_normalises_too(tiny_model, tiny_params):
    """Evaluators and transfer heads call the image tower directly, with uint8 batches."""
    rng = np.random.default_rng(4)
    size = tiny_model.image_size
    images = rng.integers(0, 256, (2, size, size, 3), np.uint8)

    def encode(m, x):
        return m.encode_image(x)["embedding"]

    apply = jax.jit(lambda p, x: tiny_model.apply({"params": p}, x, method=encode))
    np.testing.assert_allclose(
        apply(tiny_params, images), apply(tiny_params, host_normalised(images)), atol=1e-5
    )
    assert isinstance(tiny_model, sycoca.SyCoCa)
