"""SyCoCa's predict functions: which a model has, and the masking choices they report."""

from __future__ import annotations

import jax
import numpy as np

from sycoca_jax import sharding
from sycoca_jax.evaluation import predict
from sycoca_jax.models import build
from tests.helpers import config_for


def test_each_objective_has_the_functions_its_heads_allow():
    def available(objective):
        model = build.from_config(config_for(f"tiny,objective={objective}").model)
        return predict.for_model(model).available()

    # Every objective can encode and score patches against a caption (as attentive masking would).
    both = {"encode_images", "encode_texts", "relevance_inputs", "encode_image_patches"}
    assert available("clip") == both
    assert available("coca") == both | {"caption"}  # no branch chooses patches
    assert available("sycoca") == both | {"caption", "masking"}


def test_masking_reports_the_branches_choices(tiny_model, tiny_params, tiny_inputs):
    """The captioner keeps the most relevant patches and TG-MIM hides them, as in training."""
    images, tokens = tiny_inputs
    masking = predict.for_model(tiny_model).masking
    with sharding.Placement.from_config(config_for("tiny").mesh).context():
        out = jax.device_get(masking(tiny_params, images, tokens, jax.random.key(0)))
    n = tiny_model.num_patches
    keep = round(n * tiny_model.caption_keep_ratio)
    hide = round(n * tiny_model.tgmim_mask_ratio)
    assert out["relevance"].shape == (len(images), n)
    order = np.argsort(-out["relevance"], axis=1, kind="stable")
    np.testing.assert_array_equal(np.sort(out["caption_indices"], 1), np.sort(order[:, :keep], 1))
    expected_mask = np.zeros((len(images), n), bool)
    np.put_along_axis(expected_mask, order[:, :hide], True, axis=1)
    np.testing.assert_array_equal(out["tgmim_mask"], expected_mask)
