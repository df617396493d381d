"""The one image normalisation: pixels travel host→device as uint8 (4× fewer bytes than float32,
no float work on the host) and become model inputs here, inside the jitted step or evaluation.

Every image entry of the model calls ``normalize`` (``SyCoCa.__call__`` once, for the towers and
the TG-MIM targets alike; ``ViT.__call__`` for evaluators and transfer heads that encode images
directly), so training, validation, evaluation and transfer all see the same inputs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# CLIP's normalisation, applied to [0, 1] pixels.
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)
IMAGE_DTYPE = np.uint8  # what the input pipelines emit and the compiled step takes


def normalize(images: jax.Array) -> jax.Array:
    """uint8 RGB (..., 3) -> float32 with CLIP's mean and std on [0, 1] pixels. Floating-point
    images are taken as already normalised and returned unchanged, so calling this twice (the
    model, then its image tower) is harmless."""
    if jnp.issubdtype(images.dtype, jnp.floating):
        return images
    if images.dtype != jnp.uint8:
        raise TypeError(f"images must be uint8 pixels or normalised floats, got {images.dtype}")
    scaled = images.astype(jnp.float32) * jnp.float32(1 / 255)
    return (scaled - CLIP_MEAN) / CLIP_STD
