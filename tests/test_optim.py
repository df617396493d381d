"""Optimiser: which parameters decay, the schedule's shape, durations in any unit."""

from __future__ import annotations

import ml_collections
import numpy as np
import pytest

from sycoca_jax import durations, optim


def _optim_config(**overrides):
    base = dict(
        lr=1.0,
        b1=0.9,
        b2=0.98,
        eps=1e-6,
        weight_decay=0.1,
        grad_clip=1.0,
        schedule="cosine",
        end_lr_fraction=0.1,
    )
    base.update(overrides)
    return ml_collections.ConfigDict(base)


def test_weight_decay_mask(tiny_params):
    mask = optim.weight_decay_mask(tiny_params)
    assert mask["image_encoder"]["encoder"]["block_0"]["mlp"]["fc1"]["kernel"]
    assert mask["text_encoder"]["token_embedding"]["embedding"]
    assert mask["image_encoder"]["encoder"]["block_0"]["self_attention"]["query"]["kernel"]
    assert not mask["image_encoder"]["encoder"]["block_0"]["mlp"]["fc1"]["bias"]
    assert not mask["image_encoder"]["ln_final"]["scale"]
    assert not mask["image_encoder"]["posemb"]["pos_embedding"]
    assert not mask["text_encoder"]["pos_embedding"]
    assert not mask["text_encoder"]["cls"]
    assert not mask["log_temperature"]
    assert not mask["tgmim_decoder"]["mask_token"]
    assert not mask["caption_pooler"]["queries"]


def test_schedule_warmup_then_cosine_to_end():
    schedule = optim.learning_rate_schedule(_optim_config(), total_steps=110, warmup_steps=10)
    values = np.array([float(schedule(i)) for i in range(111)])
    np.testing.assert_allclose(values[:11], np.linspace(0, 1, 11), atol=1e-6)
    assert np.all(np.diff(values[10:]) <= 1e-7)
    np.testing.assert_allclose(values[110], 0.1, atol=1e-6)
    np.testing.assert_allclose(values[60], 0.1 + 0.9 * 0.5, atol=1e-3)
    linear = optim.learning_rate_schedule(_optim_config(schedule="linear"), 110, 10)
    np.testing.assert_allclose(float(linear(60)), 0.55, atol=1e-6)
    with pytest.raises(ValueError, match="schedule"):
        optim.learning_rate_schedule(_optim_config(schedule="step"), 10, 0)


def test_durations_in_any_unit():
    c = ml_collections.ConfigDict(dict(total_steps=None, total_epochs=2.0, total_examples=None))
    assert durations.to_steps(c, "total", batch_size=10, num_examples=95) == 19
    c.total_epochs, c.total_examples = None, 101
    assert durations.to_steps(c, "total", 10, None) == 11
    c.total_steps = 5
    with pytest.raises(ValueError, match="only one"):
        durations.to_steps(c, "total", 10, None)
    empty = ml_collections.ConfigDict(dict(warmup_steps=None))
    assert durations.to_steps(empty, "warmup", 10, None, default=0) == 0
    with pytest.raises(ValueError, match="set one of"):
        durations.to_steps(empty, "warmup", 10, None)
