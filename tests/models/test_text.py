"""Causality of both text decoders and the CLS token's view of the caption."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sycoca_jax.models.text import caption_input_and_target, unimodal_attention_mask


def _perturb(tokens: np.ndarray, b: int, t: int, vocab: int) -> np.ndarray:
    out = np.array(tokens)
    out[b, t] = 4 + (out[b, t] + 7) % (vocab - 4)  # another non-pad, non-special id
    return out


def test_caption_shift_is_one_position():
    tokens = jnp.array([[1, 10, 11, 12, 2, 0]])
    inputs, targets = caption_input_and_target(tokens)
    np.testing.assert_array_equal(inputs, [[1, 10, 11, 12, 2]])
    np.testing.assert_array_equal(targets, [[10, 11, 12, 2, 0]])


def test_unimodal_mask_layout():
    valid = jnp.array([[True, True, True, False, False]])
    mask = np.asarray(unimodal_attention_mask(valid).dense(6, 6))[0, 0]
    assert mask.shape == (6, 6)
    np.testing.assert_array_equal(mask[-1], [1, 1, 1, 0, 0, 1])  # CLS: all real tokens + itself
    np.testing.assert_array_equal(mask[2], [1, 1, 1, 0, 0, 0])  # causal
    assert not mask[:, 3:5].any()  # nobody reads a pad key


def test_both_decoders_are_causal(tiny_model, tiny_params, tiny_inputs):
    images, tokens = tiny_inputs
    tokens = np.asarray(tokens)
    variables = {"params": tiny_params}
    image_tokens = tiny_model.apply(variables, images, method=tiny_model.encode_image)[
        "image_tokens"
    ]

    @jax.jit
    def run(tok):
        text = tiny_model.apply(variables, tok, method=tiny_model.encode_text)
        logits, _ = tiny_model.apply(variables, image_tokens, tok, method=tiny_model.caption_logits)
        return text["token_states"], logits

    def outputs(tok):
        return tuple(np.asarray(x) for x in run(jnp.asarray(tok)))

    states, logits = outputs(tokens)
    length = int((tokens[0, :-1] != 0).sum())
    for t in range(1, length):
        new_states, new_logits = outputs(_perturb(tokens, 0, t, tiny_model.vocab_size))
        np.testing.assert_allclose(new_states[0, :t], states[0, :t], atol=1e-6)
        np.testing.assert_allclose(new_logits[0, :t], logits[0, :t], atol=1e-5)
        assert np.abs(new_states[0, t] - states[0, t]).max() > 1e-4
        assert np.abs(new_logits[0, t] - logits[0, t]).max() > 1e-4
        # Other captions in the batch are untouched.
        np.testing.assert_allclose(new_logits[1:], logits[1:], atol=1e-5)


def test_cls_depends_on_every_real_token_and_no_pad(tiny_model, tiny_params, tiny_inputs):
    _, tokens = tiny_inputs
    tokens = np.asarray(tokens)

    @jax.jit
    def run(params, tok):
        return tiny_model.apply({"params": params}, tok, method=tiny_model.encode_text)["embedding"]

    def cls_embedding(params, tok):
        return np.asarray(run(params, jnp.asarray(tok)))

    base = cls_embedding(tiny_params, tokens)
    length = int((tokens[0, :-1] != 0).sum())
    for t in range(length):
        changed = cls_embedding(tiny_params, _perturb(tokens, 0, t, tiny_model.vocab_size))
        assert np.abs(changed[0] - base[0]).max() > 1e-5, f"CLS ignores token {t}"

    # Pads: a different pad embedding, or fewer pad positions, leave the CLS unchanged.
    params = jax.tree.map(lambda x: x, tiny_params)
    table = params["text_encoder"]["token_embedding"]["embedding"]
    params["text_encoder"]["token_embedding"]["embedding"] = table.at[0].add(3.0)
    np.testing.assert_allclose(cls_embedding(params, tokens), base, atol=1e-6)
    longest = int((tokens[:, :-1] != 0).sum(axis=1).max())
    short = tokens[:, : longest + 2]  # keep every real token, drop trailing pads
    np.testing.assert_allclose(cls_embedding(tiny_params, short), base, atol=1e-5)


def test_too_long_text_is_rejected(tiny_model, tiny_params):
    tokens = jnp.ones((1, tiny_model.max_text_len + 2), jnp.int32)
    with pytest.raises(ValueError, match="exceeds max_text_len"):
        tiny_model.apply({"params": tiny_params}, tokens, method=tiny_model.encode_text)
