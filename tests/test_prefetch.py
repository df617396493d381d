"""Device prefetch: the same batches as the plain iterator, placed on the devices in the batch
sharding, and a checkpointed position that counts only the batches handed to the steps."""

from __future__ import annotations

import grain
import jax
import numpy as np
import pytest

from sycoca_jax import sharding
from sycoca_jax.data import pipeline
from sycoca_jax.train.prefetch import DevicePrefetch
from tests.helpers import tiny_config


@pytest.fixture(scope="module")
def config(data_dir):
    config = tiny_config(data_dir)
    config.batch_size = 16
    return config


@pytest.fixture(scope="module")
def placement():
    return sharding.Placement.from_config(tiny_config("/unused").mesh)


def _host_batches(config, count, state=None):
    batches = pipeline.make_train_iterator(config)
    if state is not None:
        batches.set_state(state)
    out = [next(batches) for _ in range(count)]
    batches.close()
    return out


@pytest.mark.parametrize("depth", [0, 2])
def test_prefetched_batches_equal_the_plain_ones_on_the_batch_sharding(config, placement, depth):
    expected = _host_batches(config, 5)
    prefetched = DevicePrefetch(pipeline.make_train_iterator(config), placement, depth)
    for want in expected:
        host, device = next(prefetched)
        assert sorted(host) == sorted(want) == sorted(device)
        for key, value in want.items():
            np.testing.assert_array_equal(host[key], value)
            np.testing.assert_array_equal(np.asarray(device[key]), value)
            assert device[key].sharding.is_equivalent_to(
                sharding.batch_sharding(placement.mesh), value.ndim
            )
            assert len(device[key].addressable_shards) == jax.device_count() == 8
        assert len(prefetched._queue) == depth  # the next ones are already on their way
    prefetched.close()


def test_saved_position_is_that_of_the_batches_handed_out(config, placement):
    plain = pipeline.make_train_iterator(config)
    for _ in range(3):
        next(plain)
    state_after_three = plain.get_state()
    plain.close()

    prefetched = DevicePrefetch(pipeline.make_train_iterator(config), placement, depth=2)
    for _ in range(3):
        next(prefetched)
    # Five batches were drawn from the parent, three handed out: the state says three.
    assert prefetched.get_state() == state_after_three
    assert prefetched.stats.examples == 3 * config.batch_size
    saved = prefetched.get_state()

    # Restoring drops what was prefetched and continues exactly after the third batch.
    next(prefetched)
    prefetched.set_state(saved)
    expected = _host_batches(config, 2, state=state_after_three)
    for want in expected:
        host, device = next(prefetched)
        np.testing.assert_array_equal(host["tokens"], want["tokens"])
        np.testing.assert_array_equal(np.asarray(device["image"]), want["image"])
    prefetched.close()


def test_negative_depth_is_refused(placement):
    parent = iter(grain.MapDataset.range(4).to_iter_dataset())
    with pytest.raises(ValueError, match="device prefetch depth"):
        DevicePrefetch(parent, placement, -1)
