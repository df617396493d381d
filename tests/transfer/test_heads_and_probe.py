"""The task head's shapes and masking, the VQA features read from the multimodal decoder, and
the linear probe on a separable synthetic problem."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from sycoca_jax.config_args import load_config
from sycoca_jax.transfer import heads, linear_probe, trainer
from tests.helpers import ROOT


@pytest.fixture(scope="module")
def head_and_params():
    head = heads.PooledClassifier(num_classes=7, width=16, num_heads=2)
    tokens = jnp.zeros((1, 5, 12))
    params = jax.jit(head.init)(jax.random.key(0), tokens, jnp.ones((1, 5), bool))["params"]
    return head, nn.unbox(params)


def test_pooled_classifier_shapes_and_start(head_and_params):
    head, params = head_and_params
    assert set(params) == {"pooler", "classifier"}
    assert params["pooler"]["queries"].shape == (1, 16)
    assert params["classifier"]["kernel"].shape == (16, 7)
    tokens = jax.random.normal(jax.random.key(1), (3, 5, 12))
    logits = jax.jit(head.apply)({"params": params}, tokens)
    assert logits.shape == (3, 7) and logits.dtype == jnp.float32
    np.testing.assert_array_equal(logits, 0.0)  # zero-initialised classifier: uniform start


def test_pooled_classifier_ignores_masked_tokens(head_and_params):
    head, params = head_and_params
    params = jax.tree.map(lambda x: x, params)
    params["classifier"]["kernel"] = jax.random.normal(jax.random.key(2), (16, 7))
    tokens = jax.random.normal(jax.random.key(3), (2, 5, 12))
    valid = jnp.array([[True, True, True, False, False]] * 2)
    changed = tokens.at[:, 3:].set(100.0)
    apply = jax.jit(head.apply)
    a = apply({"params": params}, tokens, valid)
    b = apply({"params": params}, changed, valid)
    np.testing.assert_allclose(a, b, atol=1e-5)
    assert not np.allclose(a, apply({"params": params}, changed, jnp.ones_like(valid)))


def test_linear_probe_learns_a_separable_problem():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 8)) * 4.0
    labels = rng.integers(0, 4, size=400)
    features = centres[labels] + rng.normal(size=(400, 8))
    w, b = linear_probe.fit(features, labels, 4, (0.0, 1e-2), steps=200, lr=5e-2)
    assert w.shape == (2, 8, 4) and b.shape == (2, 4)
    for g in range(2):
        accuracy = np.mean(np.argmax(features @ np.asarray(w[g]) + np.asarray(b[g]), -1) == labels)
        assert accuracy > 0.97
    assert np.abs(w[1]).sum() < np.abs(w[0]).sum()  # the l2 penalty shrinks the weights
    w_mini, _ = linear_probe.fit(features, labels, 4, (0.0,), steps=200, lr=5e-2, batch_size=32)
    assert np.mean(np.argmax(features @ np.asarray(w_mini[0]), -1) == labels) > 0.9


def _optim(**overrides):
    config = load_config(f"{ROOT / 'configs' / 'transfer.py'}:finetune").optim
    config.update(overrides)
    return config


def test_tower_and_head_have_their_own_learning_rates():
    config = _optim(lr=1e-2, tower_lr=1e-4, warmup_steps=0, grad_clip=0.0, weight_decay=0.0)
    tx, schedule, trainable = trainer.make_optimizer(config, total_steps=10, warmup_steps=0)
    assert trainable == ("tower", "head") and float(schedule(0)) == pytest.approx(1e-2)
    params = {"tower": {"kernel": jnp.ones(3)}, "head": {"kernel": jnp.ones(3)}}
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(updates["head"]["kernel"], -1e-2, rtol=1e-3)  # Adam: lr · sign
    np.testing.assert_allclose(updates["tower"]["kernel"], -1e-4, rtol=1e-3)
    frozen = _optim(freeze_tower=True)
    tx, _, trainable = trainer.make_optimizer(frozen, total_steps=10, warmup_steps=0)
    assert trainable == ("head",)
    assert set(tx.init({"head": params["head"]}).inner_states) == {"head"}


def test_predict_returns_rows_in_dataset_order():
    """As batches arrive from several processes: rows out of order, padding in between."""
    from sycoca_jax import sharding

    index = np.array([[4, 0, 6, 2], [5, 1, -1, 3]], np.int32)  # -1: padding
    batches = [
        {"x": (row * 10.0).astype(np.float32), "index": row, "mask": row >= 0} for row in index
    ]
    mesh = sharding.make_mesh((8, 1, 1))
    placement = sharding.Placement(mesh, sharding.logical_rules("data_parallel"))
    mesh_batches = [{k: np.repeat(v, 2) for k, v in b.items()} for b in batches]  # 8 rows
    out = trainer.predict(
        placement, lambda params, b: {"y": b["x"] + 1}, None, mesh_batches, ["x"], num_threads=0
    )
    assert out["y"].tolist() == [v * 10.0 + 1 for v in range(7) for _ in range(2)]
