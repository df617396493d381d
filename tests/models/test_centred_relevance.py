"""The ``centred_max_sim`` relevance: max token-wise similarity of mean-centred embeddings."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from sycoca_jax.evaluation import relevance_probes
from sycoca_jax.models import masking


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_caption_words_drop_bos_eos_and_pad():
    valid = jnp.array([[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1]], bool)
    words = np.asarray(masking.caption_words(valid))
    np.testing.assert_array_equal(
        words, [[0, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0], [0, 1, 1, 1, 1, 0]]
    )


def test_matches_a_numpy_reference():
    rng = np.random.default_rng(0)
    patches = rng.normal(size=(2, 6, 4)).astype(np.float32)
    tokens = rng.normal(size=(2, 5, 4)).astype(np.float32)
    valid = np.array([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], bool)
    got = masking.relevance_scores(patches, tokens, valid, "centred_max_sim")
    for b in range(2):
        words = np.flatnonzero(valid[b])[1:-1]  # drop bos and eos
        p, t = _unit(patches[b]), _unit(tokens[b, words])
        centred = (p - p.mean(0)) @ (t - t.mean(0)).T
        np.testing.assert_allclose(got[b], centred.max(-1), rtol=1e-5, atol=1e-6)
    # The evaluator's NumPy probe of the same score.
    sim = np.einsum("bne,bte->bnt", _unit(patches), _unit(tokens))
    words = np.asarray(masking.caption_words(jnp.asarray(valid)))
    probe = relevance_probes.CHEAP["double_centred_words"](dict(sim=sim, words=words))
    np.testing.assert_allclose(probe, got, rtol=1e-5, atol=1e-6)


def test_a_common_mode_no_longer_outranks_the_described_object():
    # Background patches lean towards what every word shares; the object patch matches one word.
    common, red, other = np.eye(3)[0], np.eye(3)[1], np.eye(3)[2]
    background = [common + 0.1 * other * s for s in (1, -1, 0.5, -0.5)]
    obj = 0.6 * common + 0.8 * red
    patches = np.stack([*background, obj])[None].astype(np.float32)
    words = np.stack([common + 0.3 * red, common - 0.2 * red, common + 0.1 * other])
    tokens = np.concatenate([np.zeros((1, 3)), words, np.zeros((1, 3))])[None].astype(np.float32)
    valid = np.ones((1, 5), bool)
    plain = np.asarray(masking.relevance_scores(patches, tokens, valid, "max_sim"))[0]
    centred = np.asarray(masking.relevance_scores(patches, tokens, valid, "centred_max_sim"))[0]
    assert plain.argmax() != 4  # max_sim ranks a background patch first
    assert centred.argmax() == 4  # the centred score finds the object
