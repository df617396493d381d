"""Captioning from a selection of patches, as the captioning branch sees them in training."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from sycoca_jax.tools import caption_selection


def test_generated_ids_become_pipeline_tokens():
    ids = np.array([[7, 8, 2, 9, 9], [5, 0, 0, 0, 0], [4, 4, 4, 4, 4]])
    tokens = caption_selection._as_tokens(ids, 5)
    np.testing.assert_array_equal(
        tokens, [[1, 7, 8, 2, 0, 0], [1, 5, 2, 0, 0, 0], [1, 4, 4, 4, 4, 2]]
    )


def test_selecting_every_patch_gives_the_full_image_tokens(tiny_model, tiny_params, tiny_inputs):
    images, _ = tiny_inputs
    n = tiny_model.num_patches
    variables = {"params": tiny_params}

    @jax.jit
    def both(params, indices):
        variables = {"params": params}
        full = tiny_model.apply(variables, images, method=tiny_model.encode_image)["image_tokens"]
        chosen = tiny_model.apply(
            variables, images, indices, method=tiny_model.selected_image_tokens
        )
        return full, chosen

    all_patches = jnp.broadcast_to(jnp.arange(n), (images.shape[0], n))
    full, chosen = both(variables["params"], all_patches)
    np.testing.assert_allclose(chosen, full, rtol=1e-5, atol=1e-5)
    _, half = both(variables["params"], all_patches[:, : n // 2])
    assert not np.allclose(half, full, atol=1e-3)  # fewer patches, other tokens
