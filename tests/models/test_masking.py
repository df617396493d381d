"""Attentive masking: selection against NumPy, static counts, direction, pad invariance."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sycoca_jax.models import masking


def test_selection_matches_numpy_argsort():
    scores = np.random.default_rng(0).normal(size=(4, 49)).astype(np.float32)
    reference = np.argsort(-scores, axis=1, kind="stable")
    np.testing.assert_array_equal(
        masking.keep_most_relevant(jnp.asarray(scores), 20), reference[:, :20]
    )
    visible, masked = masking.mask_most_relevant(jnp.asarray(scores), 25)
    np.testing.assert_array_equal(masked, reference[:, :25])
    np.testing.assert_array_equal(visible, reference[:, 25:])
    mask = np.asarray(masking.indices_to_mask(masked, 49))
    assert (mask.sum(axis=1) == 25).all()
    np.testing.assert_array_equal(np.sort(np.where(mask[0])[0]), np.sort(reference[0, :25]))


def test_counts_are_static_under_jit():
    @jax.jit
    def select(scores):
        keep = masking.keep_most_relevant(scores, masking.static_count(64, 0.5, "r"))
        visible, masked = masking.mask_most_relevant(scores, masking.static_count(64, 0.75, "r"))
        return keep, visible, masked

    shapes = jax.eval_shape(select, jax.ShapeDtypeStruct((8, 64), jnp.float32))
    assert [s.shape for s in shapes] == [(8, 32), (8, 16), (8, 48)]
    assert masking.static_count(196, 0.5, "r") == 98
    with pytest.raises(ValueError, match="empty side"):
        masking.static_count(4, 0.1, "ratio")


def test_max_sim_ignores_pads_and_matches_reference():
    rng = np.random.default_rng(1)
    patches = rng.normal(size=(2, 9, 5)).astype(np.float32)
    tokens = rng.normal(size=(2, 6, 5)).astype(np.float32)
    valid = np.array([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]], bool)
    scores = np.asarray(masking.relevance_scores(patches, tokens, valid, "max_sim"))
    pn = patches / np.linalg.norm(patches, axis=-1, keepdims=True)
    tn = tokens / np.linalg.norm(tokens, axis=-1, keepdims=True)
    for b in range(2):
        sim = pn[b] @ tn[b][valid[b]].T
        np.testing.assert_allclose(scores[b], sim.max(axis=1), rtol=1e-5, atol=1e-6)
    # Anything at pad positions is ignored.
    tokens2 = tokens.copy()
    tokens2[~valid] = rng.normal(size=tokens2[~valid].shape) * 100
    for mode in masking.SCORE_MODES:
        np.testing.assert_allclose(
            masking.relevance_scores(patches, tokens2, valid, mode),
            masking.relevance_scores(patches, tokens, valid, mode),
            rtol=1e-6,
        )


def test_attention_scores_match_reference():
    rng = np.random.default_rng(2)
    patches = rng.normal(size=(1, 7, 4)).astype(np.float32)
    tokens = rng.normal(size=(1, 3, 4)).astype(np.float32)
    valid = np.array([[1, 1, 0]], bool)
    scores = np.asarray(masking.relevance_scores(patches, tokens, valid, "attention", 10.0))
    pn = patches[0] / np.linalg.norm(patches[0], axis=-1, keepdims=True)
    tn = tokens[0, :2] / np.linalg.norm(tokens[0, :2], axis=-1, keepdims=True)
    logits = 10.0 * tn @ pn.T  # (tokens, patches)
    attn = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(scores[0], attn.mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(scores.sum(), 1.0, rtol=1e-5)


def test_scores_pass_no_gradient():
    patches = jnp.ones((1, 4, 3)) + jnp.arange(12.0).reshape(1, 4, 3)
    tokens = jnp.ones((1, 2, 3))
    grad = jax.grad(lambda p: masking.relevance_scores(p, tokens, jnp.ones((1, 2), bool)).sum())(
        patches
    )
    assert not np.asarray(grad).any()


def test_model_branches_select_in_the_right_direction(tiny_model, tiny_params, tiny_inputs):
    images, tokens = tiny_inputs
    out = jax.jit(
        lambda p, i, t: tiny_model.apply({"params": p}, i, t, rngs={"masking": jax.random.key(0)})
    )(tiny_params, images, tokens)
    relevance = np.asarray(out["relevance"])
    n = relevance.shape[1]
    kept = np.asarray(out["caption_indices"])
    tgmim_mask = np.asarray(out["tgmim_mask"])
    assert kept.shape[1] == n // 2 and (tgmim_mask.sum(axis=1) == n // 2).all()
    for b in range(relevance.shape[0]):
        dropped = np.setdiff1d(np.arange(n), kept[b])
        # IC keeps the most relevant patches ...
        assert relevance[b, kept[b]].min() >= relevance[b, dropped].max()
        # ... TG-MIM hides the most relevant ones.
        assert relevance[b, tgmim_mask[b]].min() >= relevance[b, ~tgmim_mask[b]].max()


def test_model_scores_do_not_depend_on_pad_tokens(tiny_model, tiny_params, tiny_inputs):
    images, tokens = tiny_inputs

    @jax.jit
    def relevance(params):
        out = tiny_model.apply(
            {"params": params}, images, tokens, rngs={"masking": jax.random.key(0)}
        )
        return out["relevance"]

    params = jax.tree.map(lambda x: x, tiny_params)
    table = params["text_encoder"]["token_embedding"]["embedding"]
    params["text_encoder"]["token_embedding"]["embedding"] = table.at[0].set(5.0)
    assert (np.asarray(tokens) == 0).any()
    np.testing.assert_allclose(relevance(params), relevance(tiny_params), atol=1e-6)


def test_random_masking_uses_the_rng(tiny_model_config, tiny_inputs):
    from sycoca_jax.models import build

    m = tiny_model_config.copy_and_resolve_references()
    m.caption_masking = m.tgmim_masking = "random"
    model = build.from_config(m)
    images, tokens = tiny_inputs
    rngs = lambda seed: {"params": jax.random.key(0), "masking": jax.random.key(seed)}  # noqa: E731
    init = jax.jit(lambda r: model.init(r, images, tokens))
    params = init(rngs(0))["params"]
    run = jax.jit(
        lambda seed: model.apply(
            {"params": params}, images, tokens, rngs={"masking": jax.random.key(seed)}
        )
    )
    a, b = run(1), run(2)
    assert "relevance" not in a
    assert not np.array_equal(a["caption_indices"], b["caption_indices"])
    assert (np.asarray(a["tgmim_mask"]).sum(axis=1) == model.num_patches // 2).all()
