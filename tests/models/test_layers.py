"""The LayerNorm every tower uses: the flat (tokens, width) view computes what flax's
LayerNorm computes on the original shape, parameters and gradients included. A scanned layer
stack computes the same whatever ``scan_unroll`` (0: no loop), and remat outside a loop keeps
its recomputation apart from the forward pass."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from sycoca_jax.models import layers


@pytest.mark.parametrize("shape", [(3, 5, 8), (4, 8), (8,)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_token_layer_norm_equals_flax_layer_norm(shape, dtype):
    x = jax.random.normal(jax.random.key(0), shape) * 3 + 1
    ours = layers.layer_norm(dtype, epsilon=1e-5)
    flax_ln = nn.LayerNorm(epsilon=1e-5, dtype=dtype, param_dtype=jnp.float32)
    params = ours.init(jax.random.key(1), x)
    assert jax.tree.structure(nn.unbox(params)) == jax.tree.structure(
        flax_ln.init(jax.random.key(1), x)
    )
    params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(2), p.shape), params)

    def loss(module):
        def f(params, x):
            y = module.apply(params, x)
            return jnp.sum(jnp.sin(y.astype(jnp.float32))), y

        return jax.grad(f, argnums=(0, 1), has_aux=True)(params, x)

    (got_grads, got), (want_grads, want) = loss(ours), loss(flax_ln)
    assert got.shape == shape and got.dtype == want.dtype
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads), strict=True):
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), atol=1e-5)


def _stack(scan_unroll: int, remat: str = "none") -> layers.BlockStack:
    return layers.BlockStack(
        depth=4,
        num_heads=4,
        mlp_dim=64,
        cross_attention=True,
        scan=True,
        scan_unroll=scan_unroll,
        remat=remat,
    )


def _stack_inputs():
    x = jax.random.normal(jax.random.key(0), (2, 6, 16))
    context = jax.random.normal(jax.random.key(1), (2, 5, 16))
    return x, layers.causal_mask(6), context


def _flat(tree) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(a)) for a in jax.tree.leaves(tree)])


@functools.cache
def _loss_grads(scan_unroll: int, remat: str):
    """Gradients and outputs of a 4-layer stack with the same initial parameters, and its
    compiled program's text."""
    x, mask, context = _stack_inputs()
    module = _stack(scan_unroll, remat)
    params = module.init(jax.random.key(2), x, mask, context)

    def loss(p, x, context):
        y = module.apply(p, x, mask, context)
        return jnp.sum(jnp.sin(y)), y

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True)).lower(params, x, context)
    compiled = compiled.compile()
    return params, compiled(params, x, context), compiled.as_text()


@pytest.mark.parametrize(
    ("scan_unroll", "remat"), [(0, "none"), (0, "dots"), (2, "none"), (3, "dots")]
)
def test_a_scan_without_its_loop_computes_what_the_loop_does(scan_unroll, remat):
    want_params, (want_grads, want), looped_program = _loss_grads(1, remat)
    params, (got_grads, got), program = _loss_grads(scan_unroll, remat)
    # The same parameter tree (stacked on the layers axis) and the same initial values.
    assert jax.tree.structure(params) == jax.tree.structure(want_params)
    np.testing.assert_array_equal(_flat(params), _flat(want_params))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    g, w = _flat(got_grads), _flat(want_grads)
    assert np.linalg.norm(g - w) <= 1e-6 * np.linalg.norm(w)
    assert " while(" in looped_program
    # 2 layers per iteration loop twice; 0 leaves no loop, nor does 3 (one trip, which XLA
    # inlines, then the remaining layer).
    assert (" while(" in program) == (scan_unroll == 2)


@pytest.mark.parametrize(
    ("scan_unroll", "barrier"),
    [(1, False), (2, False), (0, True), (3, True)],
)
def test_remat_outside_a_loop_keeps_its_recomputation_apart(scan_unroll, barrier):
    """Layers outside a loop (no loop, or the remainder of an uneven unroll) would let XLA merge
    the backward pass's recomputation with the forward pass and keep the activations remat drops:
    their recomputation sits behind an optimisation barrier. Inside a loop none is needed."""
    x, mask, context = _stack_inputs()
    module = _stack(scan_unroll, "full")
    params = module.init(jax.random.key(2), x, mask, context)
    lowered = jax.jit(jax.grad(lambda p: jnp.sum(module.apply(p, x, mask, context)))).lower(params)
    assert ("optimization_barrier" in lowered.as_text()) == barrier


@pytest.mark.parametrize("scan_unroll", [-1, True, 1.5])
def test_scan_unroll_refuses_what_is_not_a_number_of_layers(scan_unroll):
    x, mask, context = _stack_inputs()
    with pytest.raises(ValueError, match="scan_unroll must be 0"):
        _stack(scan_unroll).init(jax.random.key(2), x, mask, context)
