"""Losses against NumPy references, and properties the trainer relies on."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from sycoca_jax import losses


def _log_softmax(x, axis):
    x = x - x.max(axis=axis, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=axis, keepdims=True))


def test_itc_matches_numpy():
    rng = np.random.default_rng(0)
    img = rng.normal(size=(6, 8))
    txt = rng.normal(size=(6, 8))
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    loss, acc = losses.itc_loss(jnp.asarray(img), jnp.asarray(txt), jnp.float32(10.0))
    logits = 10.0 * img @ txt.T
    expected = -0.5 * (np.trace(_log_softmax(logits, 1)) + np.trace(_log_softmax(logits, 0))) / 6
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    np.testing.assert_allclose(acc, np.mean(logits.argmax(1) == np.arange(6)))
    # Perfectly matched pairs at a high temperature: loss near 0.
    perfect, acc = losses.itc_loss(jnp.asarray(img), jnp.asarray(img), jnp.float32(100.0))
    assert acc == 1.0 and perfect < loss


def test_caption_loss_ignores_pads_and_smooths():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 4, 7)).astype(np.float32)
    targets = np.array([[3, 4, 2, 0], [5, 2, 0, 0]])
    weights = (targets != 0).astype(np.float32)
    loss, acc = losses.caption_loss(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights))
    logp = _log_softmax(logits, -1)
    nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(loss, (nll * weights).sum() / weights.sum(), rtol=1e-5)
    # Changing logits at pad positions changes nothing.
    changed = logits.copy()
    changed[0, 3] += 50
    changed[1, 2:] -= 50
    np.testing.assert_allclose(
        losses.caption_loss(jnp.asarray(changed), jnp.asarray(targets), jnp.asarray(weights))[0],
        loss,
        rtol=1e-6,
    )
    smooth, _ = losses.caption_loss(
        jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights), 0.1
    )
    expected = (0.9 * nll - 0.1 * logp.mean(-1)) * weights
    np.testing.assert_allclose(smooth, expected.sum() / weights.sum(), rtol=1e-5)


@pytest.mark.parametrize("chunk_len", [0, 3])
def test_caption_accuracy_is_numpy_argmax_with_first_index_on_ties(chunk_len):
    """The accuracy comes from the loss's own max-and-index pass over the logits: it equals
    NumPy's argmax (the first index on ties, bf16 logits tie often) over the non-pad targets."""
    rng = np.random.default_rng(4)
    logits = np.round(rng.normal(size=(3, 7, 11)), 0).astype(np.float32)  # many ties
    logits[0, 0, [2, 5]] = 9.0  # a tie for the top: the first index counts
    targets = rng.integers(1, 11, (3, 7))
    targets[0, 0] = 2
    targets[1, 1] = 5
    logits[1, 1, [2, 5]] = 9.0  # ... so target 5 is not the prediction
    weights = (rng.random((3, 7)) > 0.2).astype(np.float32)
    weights[:2, :2] = 1.0
    _, acc = losses.caption_loss(
        jnp.asarray(logits, jnp.bfloat16),
        jnp.asarray(targets),
        jnp.asarray(weights),
        0.0,
        chunk_len,
    )
    correct = (np.argmax(logits, -1) == targets) * weights
    assert 0 < correct.sum() < weights.sum()
    np.testing.assert_allclose(acc, correct.sum() / weights.sum(), rtol=1e-6)


def test_caption_loss_is_not_trivial_on_a_copy_task():
    """A model that copies its input (predicts token t at position t) must not get a low loss:
    that is the symptom of a missing or doubled shift."""
    tokens = np.array([[1, 10, 11, 12, 2, 0]])
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    copy_logits = np.full((1, 5, 16), -20.0, np.float32)
    copy_logits[0, np.arange(5), inputs[0]] = 20.0
    loss, acc = losses.caption_loss(
        jnp.asarray(copy_logits), jnp.asarray(targets), jnp.asarray((targets != 0) * 1.0)
    )
    assert loss > 10 and acc == 0


def test_tgmim_loss_counts_masked_patches_only():
    rng = np.random.default_rng(2)
    pred = rng.normal(size=(2, 5, 3)).astype(np.float32)
    target = rng.normal(size=(2, 5, 3)).astype(np.float32)
    mask = np.array([[1, 0, 1, 0, 0], [0, 0, 0, 1, 1]], bool)
    loss = losses.tgmim_loss(jnp.asarray(pred), jnp.asarray(target), jnp.asarray(mask))
    expected = ((pred - target) ** 2).mean(-1)[mask].mean()
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    pred[~mask] = 1e3
    np.testing.assert_allclose(
        losses.tgmim_loss(jnp.asarray(pred), jnp.asarray(target), jnp.asarray(mask)),
        loss,
        rtol=1e-6,
    )


def _loss_config(itc=1.0, ic=2.0, mim=1.0):
    return ml_collections.ConfigDict(
        dict(itc_weight=itc, caption_weight=ic, tgmim_weight=mim, label_smoothing=0.0)
    )


def test_total_loss_weights_and_terms():
    rng = np.random.default_rng(3)
    emb = rng.normal(size=(3, 4)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    outputs = {
        "image_embedding": emb,
        "text_embedding": emb[::-1].copy(),
        "temperature": jnp.float32(5.0),
        "caption_logits": rng.normal(size=(3, 4, 6)).astype(np.float32),
        "caption_targets": np.array([[1, 2, 0, 0]] * 3),
        "caption_weights": np.array([[1, 1, 0, 0]] * 3, np.float32),
        "tgmim_prediction": rng.normal(size=(3, 5, 2)).astype(np.float32),
        "tgmim_target": rng.normal(size=(3, 5, 2)).astype(np.float32),
        "tgmim_mask": np.array([[1, 1, 0, 0, 0]] * 3, bool),
    }
    total, metrics = losses.total_loss(outputs, _loss_config())
    np.testing.assert_allclose(
        total, metrics["loss/itc"] + 2 * metrics["loss/caption"] + metrics["loss/tgmim"], rtol=1e-6
    )
    _, coca = losses.total_loss(outputs, _loss_config(mim=0.0))
    assert "loss/tgmim" not in coca
    _, clip = losses.total_loss(
        {k: v for k, v in outputs.items() if not k.startswith(("caption", "mim"))},
        _loss_config(ic=0.0, mim=0.0),
    )
    assert set(clip) == {"loss", "loss/itc", "accuracy/itc", "temperature"}
    assert jax.tree.leaves(clip)


def test_loss_config_must_match_the_model():
    model = ml_collections.ConfigDict(dict(use_captioning=True, use_tgmim=False))
    with pytest.raises(ValueError, match="tgmim_weight"):
        losses.check_loss_config(_loss_config(), model)
    with pytest.raises(ValueError, match="nothing to train"):
        losses.check_loss_config(_loss_config(0.0, 0.0, 0.0), model)
