"""The LayerNorm every tower uses: the flat (tokens, width) view computes what flax's
LayerNorm computes on the original shape, parameters and gradients included."""

from __future__ import annotations

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
