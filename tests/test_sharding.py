"""Meshes, rule presets and clear errors before anything compiles."""

from __future__ import annotations

import jax
import ml_collections
import numpy as np
import pytest
from flax import linen as nn
from jax.sharding import PartitionSpec

from sycoca_jax import sharding
from sycoca_jax.data import pipeline
from sycoca_jax.models import build
from tests.helpers import config_for


def test_mesh_shapes_and_errors():
    assert sharding.resolve_mesh_shape((-1, 1, 1), 8) == (8, 1, 1)
    assert sharding.resolve_mesh_shape((2, -1, 2), 8) == (2, 2, 2)
    with pytest.raises(ValueError, match="needs 16 devices but 8 are present"):
        sharding.resolve_mesh_shape((4, 4, 1), 8)
    with pytest.raises(ValueError, match="does not divide"):
        sharding.resolve_mesh_shape((3, -1, 1), 8)
    with pytest.raises(ValueError, match="at most one -1"):
        sharding.resolve_mesh_shape((-1, -1, 1), 8)
    mesh = sharding.make_mesh((2, 2, 2))
    assert mesh.axis_names == sharding.MESH_AXES
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


def test_batch_must_divide_the_data_parallel_size():
    mesh = sharding.make_mesh((2, 4, 1))
    sharding.check_batch_size(16, mesh)
    with pytest.raises(ValueError, match=r"not divisible by the data-parallel size .* = 8"):
        sharding.check_batch_size(12, mesh)
    with pytest.raises(ValueError, match="microbatch 4"):
        sharding.check_batch_size(16, mesh, microbatches=4)


@pytest.mark.parametrize("preset", sorted(sharding.RULE_PRESETS))
def test_rule_presets_cover_every_logical_axis(preset):
    """Every logical name the model uses has a rule, and sharded dims divide the mesh."""
    model = build.from_config(config_for("B/16").model)
    images = jax.ShapeDtypeStruct((1, 224, 224, 3), "float32")
    tokens = jax.ShapeDtypeStruct((1, 77), "int32")
    rngs = {"params": jax.random.key(0), "masking": jax.random.key(1)}
    boxed = jax.eval_shape(lambda i, t: model.init(rngs, i, t), images, tokens)["params"]
    names = {
        name
        for spec in jax.tree.leaves(
            nn.get_partition_spec(boxed),
            is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec),
        )
        for name in spec
        if name is not None
    }
    rules = dict(sharding.logical_rules(preset))
    assert names <= set(rules), names - set(rules)
    mesh = sharding.make_mesh((2, 2, 2))
    shardings = sharding.shardings_from_boxed(boxed, mesh, sharding.logical_rules(preset))
    for leaf, named in zip(
        jax.tree.leaves(nn.unbox(boxed)), jax.tree.leaves(shardings), strict=True
    ):
        named.shard_shape(leaf.shape)  # raises if a dimension does not divide


def test_unknown_preset_is_named():
    with pytest.raises(ValueError, match="unknown sharding rules 'zero3'"):
        sharding.logical_rules("zero3")


def test_dimensions_the_mesh_does_not_divide_are_replicated():
    m = config_for("tiny").model
    m.image_heads = 3
    m.image_width = 96
    model = build.from_config(m)
    images = jax.ShapeDtypeStruct((1, 64, 64, 3), "float32")
    tokens = jax.ShapeDtypeStruct((1, m.max_text_len + 1), "int32")
    rngs = {"params": jax.random.key(0), "masking": jax.random.key(1)}
    boxed = jax.eval_shape(lambda i, t: model.init(rngs, i, t), images, tokens)["params"]
    mesh = sharding.make_mesh((2, 2, 2))
    shardings = sharding.shardings_from_boxed(boxed, mesh, sharding.logical_rules("fsdp_tensor"))
    query = shardings["image_encoder"]["encoder"]["block_0"]["self_attention"]["query"]["kernel"]
    assert query.spec == jax.sharding.PartitionSpec("fsdp", None, None)  # 3 heads: not split
    mlp = shardings["image_encoder"]["encoder"]["block_0"]["mlp"]["fc1"]["kernel"]
    assert mlp.spec == jax.sharding.PartitionSpec("fsdp", "tensor")


def test_one_placement_lays_out_state_and_batches():
    """``Placement`` is what training, transfer and the input pipeline share: the sharded
    layout of a boxed state, the batch sharding, and global batches built from host arrays."""
    mesh_config = ml_collections.ConfigDict(dict(shape=(2, 4, 1), rules="fsdp"))
    placement = sharding.Placement.from_config(mesh_config)
    assert dict(placement.mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert placement.rules == sharding.fsdp_rules() and placement.num_devices == 8
    boxed = {
        "kernel": nn.Partitioned(jax.ShapeDtypeStruct((8, 6), "float32"), ("embed", "mlp")),
        "step": jax.ShapeDtypeStruct((), "int32"),
    }
    abstract, shardings = placement.abstract(boxed)
    assert shardings["kernel"].spec == PartitionSpec("fsdp", None)
    assert shardings["step"].spec == PartitionSpec()
    assert abstract["kernel"].shape == (8, 6) and abstract["kernel"].sharding == shardings["kernel"]
    host = {"x": np.arange(32, dtype=np.float32).reshape(16, 2)}
    batch = pipeline.make_global_batch(host, placement)
    assert batch["x"].sharding == placement.batch_sharding
    assert placement.batch_sharding.spec == PartitionSpec(("data", "fsdp"))
    np.testing.assert_array_equal(np.asarray(batch["x"]), host["x"])
    with pytest.raises(ValueError, match="multiple of 8"):
        pipeline.make_global_batch({"x": np.zeros((4, 2))}, placement)
