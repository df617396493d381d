"""The captioning cross-entropy in chunks (custom VJP): loss and gradient equal to the plain
float32 log-softmax version, and the compiled step's temporaries drop from whole float32 copies
of the batch × length × vocabulary logits to one chunk."""

from __future__ import annotations

import functools
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sycoca_jax import losses


def plain_caption_loss(logits, targets, weights, label_smoothing=0.0):
    """Today's formulation before chunking: log-softmax of float32 logits, autodiff backward."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    if label_smoothing:
        nll = (1.0 - label_smoothing) * nll - label_smoothing * jnp.mean(log_probs, axis=-1)
    return jnp.sum(nll * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def _inputs(seed=0, b=3, length=11, vocab=37, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    logits = jnp.asarray(rng.normal(size=(b, length, vocab)) * 3, dtype)
    targets = jnp.asarray(rng.integers(1, vocab, (b, length)), jnp.int32)
    weights = jnp.asarray(rng.random((b, length)) > 0.3, jnp.float32)
    return logits, targets, weights


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("chunk_len", [0, 1, 4, 11, 20])  # all, one, with a tail, exact, over
def test_loss_and_gradient_equal_the_plain_version(label_smoothing, chunk_len):
    logits, targets, weights = _inputs()

    def chunked(x):
        return losses.caption_loss(x, targets, weights, label_smoothing, chunk_len)[0]

    loss, grad = jax.jit(jax.value_and_grad(chunked))(logits)
    ref_loss, ref_grad = jax.value_and_grad(
        lambda x: plain_caption_loss(x, targets, weights, label_smoothing)
    )(logits)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    np.testing.assert_allclose(grad, ref_grad, atol=1e-7)  # float32 rounding
    assert np.abs(np.asarray(grad)).max() > 1e-3  # a real gradient, not zeros


def test_bfloat16_logits_keep_their_dtype_and_match_within_bf16_rounding():
    logits, targets, weights = _inputs(1, dtype=jnp.bfloat16)
    loss, grad = jax.value_and_grad(lambda x: losses.caption_loss(x, targets, weights, 0.1, 4)[0])(
        logits
    )
    ref_loss, ref_grad = jax.value_and_grad(lambda x: plain_caption_loss(x, targets, weights, 0.1))(
        logits
    )
    assert grad.dtype == jnp.bfloat16  # the gradient is written in the logits' dtype
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)  # both read the same bf16 values
    # The plain version rounds its float32 gradient to bf16 once; so does the chunked one.
    np.testing.assert_allclose(
        np.asarray(grad, np.float32), np.asarray(ref_grad, np.float32), atol=2e-3, rtol=1e-2
    )


def _reads_of(jaxpr, shape) -> list[str]:
    """Reductions and gathers over an array of ``shape``, anywhere in ``jaxpr`` (loop bodies,
    custom-VJP functions)."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name.startswith(("reduce", "argm", "gather")) and any(
            getattr(v.aval, "shape", None) == shape for v in eqn.invars
        ):
            found.append(eqn.primitive.name)
        for param in eqn.params.values():
            inner = getattr(param, "jaxpr", param)
            if hasattr(inner, "eqns"):
                found += _reads_of(inner, shape)
    return found


def test_the_forward_pass_reads_the_logits_twice():
    """What the loss needs from the vocabulary-sized logits comes from two reductions: the
    maximum with its index, the target's logit and the row sum in one (``_one_pass``), then
    the exponentials. The plain formulation read them five times with label smoothing (max,
    sum of exponentials, target gather, mean, and the accuracy's argmax)."""
    logits, targets, weights = _inputs()
    for chunk_len in (0, 4):
        loss = functools.partial(losses.caption_loss, label_smoothing=0.1, chunk_len=chunk_len)
        jaxpr = jax.make_jaxpr(loss)(logits, targets, weights).jaxpr
        chunk = logits.shape[1] if chunk_len == 0 else chunk_len
        assert _reads_of(jaxpr, (3, chunk, 37)) == ["reduce", "reduce_sum"]
    plain = jax.make_jaxpr(lambda x: plain_caption_loss(x, targets, weights, 0.1))(logits).jaxpr
    assert len(_reads_of(plain, logits.shape)) >= 4


def _temp_bytes(loss_fn, b, length, vocab, dtype, sharding=None):
    """Compiled temporaries of the loss and its gradient w.r.t. (B, L, V) logits of ``dtype``
    (what the text side's output layer hands the loss)."""
    extra = {} if sharding is None else {"sharding": sharding}
    logits = jax.ShapeDtypeStruct((b, length, vocab), dtype, **extra)
    targets = jax.ShapeDtypeStruct((b, length), jnp.int32, **extra)
    weights = jax.ShapeDtypeStruct((b, length), jnp.float32, **extra)
    compiled = jax.jit(jax.value_and_grad(loss_fn)).lower(logits, targets, weights).compile()
    return compiled.memory_analysis().temp_size_in_bytes


# B/16's text side: 76 positions, a 64,000-piece vocabulary (8 captions).
B16_TEXT = dict(b=8, length=76, vocab=64_000)


def test_compiled_temporaries_drop_to_one_chunk_on_cpu():
    """float32 on CPU (the CPU's own compute dtype): the plain version keeps two float32
    B×L×V arrays (log-probabilities and their gradient, 297 MiB at B=8), the chunked one a
    chunk of 8 positions (15.6 MiB): the expected factor is 2·76/8 = 19. (Measured: 296.9 MiB
    → 15.6 MiB.) With bfloat16 logits the CPU backend itself upcasts the gradient buffer to
    float32, so the bf16 figure is measured on the TPU compiler below."""
    plain = _temp_bytes(plain_caption_loss, dtype=jnp.float32, **B16_TEXT)
    chunked = _temp_bytes(
        lambda x, t, w: losses.caption_loss(x, t, w, 0.0, 8)[0], dtype=jnp.float32, **B16_TEXT
    )
    logits_f32 = 4 * 8 * 76 * 64_000
    assert plain >= 1.9 * logits_f32  # two whole float32 copies
    assert chunked <= 1.2 * logits_f32 * 8 / 76  # about one chunk
    assert plain / chunked > 15


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs libtpu")
def test_bf16_temporaries_drop_on_the_tpu_compiler():
    """Compiled (not run) for one v5p chip: bf16 logits, plain 297 MiB of temporaries at B=16
    (a float32 copy), chunked 24 MiB."""
    from jax.experimental import topologies
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    devices = topologies.get_topology_desc(
        "v5p:2x2x1",
        "tpu",
        chip_config_name="megacore",
        chips_per_host_bounds=(2, 2, 1),
        num_slices=1,
        wrap=[False] * 3,
    ).devices
    one = NamedSharding(Mesh(np.asarray(devices[:1]), ("x",)), PartitionSpec())
    shape = {**B16_TEXT, "b": 16}
    plain = _temp_bytes(plain_caption_loss, dtype=jnp.bfloat16, sharding=one, **shape)
    chunked = _temp_bytes(
        lambda x, t, w: losses.caption_loss(x, t, w, 0.0, 8)[0],
        dtype=jnp.bfloat16,
        sharding=one,
        **shape,
    )
    assert plain / chunked > 8, (plain, chunked)
