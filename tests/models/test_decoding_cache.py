"""KV-cached decoding equals the teacher-forced forward, token by token and in chunks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sycoca_jax.models import build, convert, sycoca


@pytest.fixture(scope="module")
def full_length_tokens(tiny_model):
    """Captions with no padding before the last position, so every position is comparable."""
    rng = np.random.default_rng(5)
    tokens = rng.integers(4, tiny_model.vocab_size, size=(2, tiny_model.max_text_len + 1))
    tokens[:, 0] = 1
    return jnp.asarray(tokens, jnp.int32)


def _decode(model, params, image_tokens, text_input, chunks):
    decoder = model.clone(decode=True)
    cache = build.init_decode_cache(model, text_input.shape[0])

    @jax.jit
    def step(cache, image_tokens, chunk):
        logits, updated = decoder.apply(
            {"params": params, "cache": cache},
            image_tokens,
            chunk,
            method=sycoca.SyCoCa.decode_step,
            mutable=["cache"],
        )
        return logits, updated["cache"]

    outputs, start = [], 0
    for i, size in enumerate(chunks):
        logits, cache = step(
            cache, image_tokens if i == 0 else None, text_input[:, start : start + size]
        )
        outputs.append(logits)
        start += size
    return jnp.concatenate(outputs, axis=1)


@pytest.mark.parametrize("scan, scan_unroll", [(False, 1), (True, 1), (True, 0)])
def test_cached_decoding_matches_full_forward(
    tiny_model, tiny_params, full_length_tokens, scan, scan_unroll
):
    model, params = tiny_model, tiny_params
    if scan:
        model = model.clone(scan=True, scan_unroll=scan_unroll)
        params = convert.to_scanned(params)
    tokens = full_length_tokens
    images = jnp.asarray(np.random.default_rng(6).normal(size=(2, 64, 64, 3)), jnp.float32)

    @jax.jit
    def teacher_forced(params):
        image_tokens = model.apply({"params": params}, images, method=model.encode_image)[
            "image_tokens"
        ]
        return image_tokens, model.apply(
            {"params": params}, image_tokens, tokens, method=model.caption_logits
        )[0]

    image_tokens, full = teacher_forced(params)
    text_input = tokens[:, :-1]
    length = text_input.shape[1]
    one_by_one = _decode(model, params, image_tokens, text_input, [1] * length)
    np.testing.assert_allclose(one_by_one, full, atol=2e-5, rtol=1e-4)
    chunked = _decode(model, params, image_tokens, text_input, [3, 1, 5, length - 9])
    np.testing.assert_allclose(chunked, full, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("scan_unroll", [1, 0])
def test_scan_and_unrolled_layouts_compute_the_same(
    tiny_model, tiny_params, tiny_inputs, scan_unroll
):
    """Scanned with a loop over the layers (``scan_unroll=1``) or with none (0, every tower)."""
    images, tokens = tiny_inputs

    def forward(model):
        return jax.jit(
            lambda p: model.apply(
                {"params": p}, images, tokens, rngs={"masking": jax.random.key(0)}
            )
        )

    unrolled = forward(tiny_model)(tiny_params)
    scanned_model = tiny_model.clone(scan=True, scan_unroll=scan_unroll)
    stacked = convert.to_scanned(tiny_params)
    expected_shapes = jax.tree.map(lambda x: x.shape, build.abstract_params(scanned_model))
    assert jax.tree.map(lambda x: x.shape, stacked) == expected_shapes
    scanned = forward(scanned_model)(stacked)
    # Every stack takes the setting: no loop is left with 0 (a depth-2 TG-MIM decoder, since
    # a one-layer stack has no loop to lose).
    deeper = scanned_model.clone(decoder_depth=2)
    lowered = forward(deeper).lower(build.abstract_params(deeper)).as_text()
    assert ("stablehlo.while" in lowered) == (scan_unroll == 1)
    for key in unrolled:
        np.testing.assert_allclose(scanned[key], unrolled[key], atol=1e-5, rtol=1e-5, err_msg=key)


def _loss_grad(model, params, images, tokens):
    def loss(p):
        out = model.apply({"params": p}, images, tokens, rngs={"masking": jax.random.key(0)})
        return jnp.sum(out["caption_logits"] ** 2) + jnp.sum(out["tgmim_prediction"] ** 2)

    return jax.jit(jax.grad(loss))(params)


@pytest.fixture(scope="module")
def plain_grads(tiny_model, tiny_params, tiny_inputs):
    return _loss_grad(tiny_model, tiny_params, *tiny_inputs)


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_keeps_gradients(tiny_model, tiny_params, tiny_inputs, plain_grads, remat):
    grads = _loss_grad(tiny_model.clone(remat=remat), tiny_params, *tiny_inputs)
    scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(plain_grads))
    for a, b in zip(jax.tree.leaves(plain_grads), jax.tree.leaves(grads), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6 * scale)


def test_decode_step_needs_decode_mode(tiny_model, tiny_params):
    with pytest.raises(ValueError, match="decode=True"):
        tiny_model.apply(
            {"params": tiny_params},
            None,
            jnp.ones((1, 1), jnp.int32),
            method=tiny_model.decode_step,
        )
