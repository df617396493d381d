"""The LayerNorm every tower uses: the flat (tokens, width) view computes what flax's
LayerNorm computes on the original shape, parameters and gradients included. A scanned layer
stack computes the same whatever ``scan_unroll`` (0: no loop), and remat outside a loop keeps
its recomputation apart from the forward pass."""

from __future__ import annotations

import contextlib
import functools
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax.ad_checkpoint import print_saved_residuals

from sycoca_jax.models import layers
from sycoca_jax.models import remat as remat_policies


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
    ("scan_unroll", "remat"),
    [(0, "none"), (0, "dots"), (2, "none"), (3, "dots"), (0, "dots_attention_gelu")],
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


def _saved(fn, *args) -> str:
    """What the forward pass keeps for the backward (jax.ad_checkpoint.print_saved_residuals)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        print_saved_residuals(fn, *args)
    return out.getvalue()


@pytest.mark.parametrize("mask_name", ["causal", "padding"])
def test_dots_attention_keeps_the_kernels_residuals_instead_of_rerunning_it(mask_name):
    """Under ``dots`` the backward pass re-runs the attention kernel's forward (splash, run here
    interpreted) for its output and log-sum-exp; ``dots_attention`` keeps both, and the
    gradients are the same."""
    b, t, h, d = 2, 8, 2, 128
    q, k, v = (jax.random.normal(jax.random.key(i), (b, t, h, d)) for i in range(3))
    if mask_name == "causal":
        mask = layers.AttentionMask(causal=True)
    else:
        mask = layers.key_padding_mask(jnp.arange(t)[None, :] < jnp.array([[t], [5]]))

    def loss(remat: str):
        def f(q, k, v):
            return jnp.sum(jnp.sin(layers.dot_product_attention(q, k, v, mask, "splash")))

        return jax.checkpoint(f, policy=remat_policies.REMAT_POLICIES[remat])

    kernel_output = "output of jitted function '_splash_attention'"
    assert _saved(loss("dots"), q, k, v).count(kernel_output) == 0
    saved = _saved(loss("dots_attention"), q, k, v)
    # its output and log-sum-exp, at splash's padded length (one block of 128)
    assert saved.count(kernel_output) == 2
    assert f"f32[{b},{h},128,{d}] {kernel_output}" in saved
    assert f"f32[{b},{h},128] {kernel_output}" in saved
    want = jax.grad(loss("dots"), argnums=(0, 1, 2))(q, k, v)
    got = jax.grad(loss("dots_attention"), argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, atol=1e-5)


def _module_loss(module: nn.Module, shape: tuple[int, ...]):
    """``remat -> loss(params, x)`` of one module under that policy, its parameters and input."""
    x = jax.random.normal(jax.random.key(0), shape)
    params = module.init(jax.random.key(1), x)

    def loss(remat: str):
        def f(p, x):
            return jnp.sum(jnp.sin(module.apply(p, x)))

        return jax.checkpoint(f, policy=remat_policies.REMAT_POLICIES[remat])

    return loss, params, x


def test_dots_attention_keeps_queries_keys_and_values_after_their_bias():
    """The attention kernel's backward reads q, k and v: under ``dots`` only the products before
    the bias are kept, so the bias add runs again in the backward (and cannot fold into the
    product's cuBLAS call in the forward, where the bare product is kept too)."""
    loss, params, x = _module_loss(layers.MultiHeadAttention(num_heads=2), (2, 5, 8))
    named, bare = "f32[2,5,2,4] named 'attention_inputs'", "f32[2,5,8] output of dot_general"
    saved = _saved(loss("dots"), params, x)
    assert named not in saved and saved.count(bare) == 4  # q, k, v and the output projection
    for remat in ("dots_attention", "dots_attention_gelu"):
        saved = _saved(loss(remat), params, x)
        assert saved.count(named) == 3 and saved.count(bare) == 1, saved
    want = jax.grad(loss("dots"))(params, x)
    got = jax.grad(loss("dots_attention"))(params, x)
    np.testing.assert_allclose(_flat(got), _flat(want), rtol=1e-6, atol=1e-7)


def test_the_policies_name_jax_s_cudnn_attention_call():
    """cuDNN's forward is recognised by its primitive's name (no CUDA here to trace it): a jax
    that renames it would silently fall back to re-running the kernel."""
    from jax._src.cudnn import fused_attention_stablehlo as cudnn

    forward_name = remat_policies._CUDNN_ATTENTION_FORWARD
    assert cudnn._dot_product_attention_fwd_p_wrapper.name == forward_name
    policy = remat_policies.REMAT_POLICIES["dots_attention"]
    assert policy(cudnn._dot_product_attention_fwd_p_wrapper) is True
    assert policy(cudnn._dot_product_attention_bwd_p_wrapper) is False


def test_dots_attention_gelu_keeps_the_mlp_activation_and_the_gradients():
    loss, params, x = _module_loss(layers.Mlp(hidden_dim=32), (2, 3, 8))
    activation = "f32[2,3,32] named 'mlp_activation'"
    assert activation not in _saved(loss("dots_attention"), params, x)
    assert activation in _saved(loss("dots_attention_gelu"), params, x)
    want = jax.grad(loss("dots"))(params, x)
    got = jax.grad(loss("dots_attention_gelu"))(params, x)
    np.testing.assert_allclose(_flat(got), _flat(want), rtol=1e-6, atol=1e-7)
