"""Parameter conversions: scan <-> unrolled layouts round-trip exactly (that both layouts compute
the same function with converted params is tests/models/test_decoding_cache.py's
test_scan_and_unrolled_layouts_compute_the_same); position-embedding resampling against fields
it must keep and against jax.image."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sycoca_jax.models import build, convert


def _assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _shapes(tree):
    return jax.tree.map(lambda x: tuple(x.shape), tree)


@pytest.fixture(scope="module")
def scanned_params(tiny_params):
    return convert.to_scanned(jax.device_get(tiny_params))


def test_layouts_match_the_models_and_round_trip_exactly(tiny_model, tiny_params, scanned_params):
    scanned_model = tiny_model.clone(scan=True)
    assert _shapes(scanned_params) == _shapes(build.abstract_params(scanned_model))
    unrolled = convert.to_unrolled(scanned_params)
    assert _shapes(unrolled) == _shapes(build.abstract_params(tiny_model))
    _assert_trees_equal(unrolled, jax.device_get(tiny_params))
    _assert_trees_equal(convert.to_scanned(unrolled), scanned_params)
    # Converting to the layout a tree already has changes nothing.
    _assert_trees_equal(convert.to_scanned(scanned_params), scanned_params)
    _assert_trees_equal(convert.to_unrolled(unrolled), unrolled)


def test_scanned_blocks_must_agree_on_depth():
    bad = {"encoder": {"blocks": {"a": np.zeros((2, 3)), "b": np.zeros((3, 3))}}}
    with pytest.raises(ValueError, match="layer count"):
        convert.to_unrolled(bad)


@pytest.mark.parametrize("method", convert.RESAMPLE_METHODS)
def test_resampling_to_the_same_grid_is_the_identity(method):
    posemb = np.random.default_rng(0).normal(size=(6 * 5, 7)).astype(np.float32)
    out = convert.resample_posemb(posemb, (6, 5), (6, 5), method)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, posemb)


def _field(grid, coefficients):
    """A field over the image, a + b*y + c*x per channel, sampled at each cell's centre."""
    gh, gw = grid
    y = (np.arange(gh) + 0.5) / gh
    x = (np.arange(gw) + 0.5) / gw
    a, b, c = (np.asarray(v)[None, None, :] for v in coefficients)
    return (a + b * y[:, None, None] + c * x[None, :, None]).reshape(gh * gw, -1)


@pytest.mark.parametrize("method", convert.RESAMPLE_METHODS)
@pytest.mark.parametrize("new_grid", [(12, 12), (10, 7), (3, 4), (1, 1)])
def test_constant_and_linear_fields_stay_the_same_field(method, new_grid):
    rng = np.random.default_rng(1)
    coefficients = rng.normal(size=(3, 4))
    old = _field((8, 8), coefficients)
    new = convert.resample_posemb(old, (8, 8), new_grid, method)
    np.testing.assert_allclose(new, _field(new_grid, coefficients), atol=1e-12)
    constant = np.full((64, 4), 0.25, np.float32)
    np.testing.assert_allclose(
        convert.resample_posemb(constant, (8, 8), new_grid, method), 0.25, atol=1e-6
    )


@pytest.mark.parametrize("method, jax_method", [("bilinear", "linear"), ("bicubic", "cubic")])
def test_interior_matches_jax_image_resize(method, jax_method):
    """Away from the border (where jax.image renormalises its weights and we extend the grid
    linearly) both are the same half-pixel-centred interpolation."""
    old = np.random.default_rng(2).normal(size=(8, 8, 3))
    ours = convert.resample_posemb(old.reshape(64, 3), (8, 8), (16, 16), method).reshape(16, 16, 3)
    theirs = jax.image.resize(
        jnp.asarray(old, jnp.float32), (16, 16, 3), jax_method, antialias=False
    )
    inner = slice(4, 12)
    np.testing.assert_allclose(ours[inner, inner], np.asarray(theirs)[inner, inner], atol=1e-5)


def test_resampling_checks_the_grid():
    with pytest.raises(ValueError, match="not a 4x4 grid"):
        convert.resample_posemb(np.zeros((15, 2)), (4, 4), (8, 8))
    with pytest.raises(ValueError, match="resample method"):
        convert.resample_posemb(np.zeros((16, 2)), (4, 4), (8, 8), "nearest")
    with pytest.raises(ValueError, match="multiple of the patch size 8"):
        convert.image_grid(100, 8)


def test_convert_resamples_both_image_posembs(tiny_model_config, tiny_params):
    fields = tiny_model_config.to_dict()
    params, model = convert.convert(jax.device_get(tiny_params), fields, image_size=96)
    assert model["image_size"] == 96 and fields["image_size"] == 64  # the input is not changed
    new_model = build.from_config(model)
    assert _shapes(params) == _shapes(build.abstract_params(new_model))
    grid = (96 // fields["patch_size"],) * 2
    for module in ("image_encoder", "tgmim_decoder"):
        assert params[module]["posemb"]["pos_embedding"].shape[0] == grid[0] * grid[1]


def test_a_class_token_slot_is_kept_when_resampling():
    """open_clip's layout: the image encoder's first position row is the class token's; it is
    kept, and only the grid rows after it are resampled (the TG-MIM decoder's has no such row)."""
    grid = np.arange(4 * 4 * 2, dtype=np.float32).reshape(16, 2)
    table = np.concatenate([np.full((1, 2), -7.0, np.float32), grid])
    params = {"image_encoder": {"posemb": {"pos_embedding": table}}}
    fields = dict(image_size=32, patch_size=8, class_token=True)
    out, new_fields = convert.convert(params, fields, image_size=48)
    resampled = out["image_encoder"]["posemb"]["pos_embedding"]
    assert resampled.shape == (1 + 36, 2) and new_fields["image_size"] == 48
    np.testing.assert_array_equal(resampled[0], [-7.0, -7.0])
    np.testing.assert_allclose(resampled[1:], convert.resample_posemb(grid, (4, 4), (6, 6)))
