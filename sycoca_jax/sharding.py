"""Meshes and logical-axis rules.

The mesh always has the axes ``("data", "fsdp", "tensor")``; the batch is split over
``data × fsdp``. Rule presets map the models' logical axis names to mesh axes:

- ``data_parallel``: every parameter replicated;
- ``fsdp``: parameters (and optimiser state) split along their ``embed`` axis over ``fsdp``;
- ``fsdp_tensor``: as ``fsdp``, plus Megatron-style splits of MLP, heads and vocabulary over
  ``tensor``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

Rules = tuple[tuple[str, Any], ...]

_ACTIVATIONS: Rules = (
    ("act_batch", BATCH_AXES),
    ("act_len", None),
    ("act_embed", None),
)
_UNSHARDED = ("layers", "patch_len", "text_len", "queries", "patch", "proj", "kv")


def data_parallel_rules() -> Rules:
    return (
        _ACTIVATIONS
        + tuple((name, None) for name in _UNSHARDED)
        + (
            ("embed", None),
            ("mlp", None),
            ("heads", None),
            ("vocab", None),
            ("act_mlp", None),
            ("act_vocab", None),
        )
    )


def fsdp_rules() -> Rules:
    return (
        _ACTIVATIONS
        + tuple((name, None) for name in _UNSHARDED)
        + (
            ("embed", "fsdp"),
            ("mlp", None),
            ("heads", None),
            ("vocab", None),
            ("act_mlp", None),
            ("act_vocab", None),
        )
    )


def fsdp_tensor_rules() -> Rules:
    return (
        _ACTIVATIONS
        + tuple((name, None) for name in _UNSHARDED)
        + (
            ("embed", "fsdp"),
            ("mlp", "tensor"),
            ("heads", "tensor"),
            ("vocab", "tensor"),
            ("act_mlp", "tensor"),
            ("act_vocab", "tensor"),
        )
    )


RULE_PRESETS = {
    "data_parallel": data_parallel_rules,
    "fsdp": fsdp_rules,
    "fsdp_tensor": fsdp_tensor_rules,
}


def logical_rules(preset: str) -> Rules:
    if preset not in RULE_PRESETS:
        raise ValueError(f"unknown sharding rules {preset!r}; choose from {sorted(RULE_PRESETS)}")
    return RULE_PRESETS[preset]()


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, int, int]:
    """Fill in the one ``-1`` entry; error unless the product equals the device count."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != len(MESH_AXES):
        raise ValueError(f"mesh shape needs {len(MESH_AXES)} entries {MESH_AXES}, got {shape}")
    unknown = [i for i, s in enumerate(shape) if s == -1]
    if len(unknown) > 1 or any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"mesh shape {shape}: sizes must be positive, with at most one -1")
    known = math.prod(s for s in shape if s != -1)
    if unknown:
        if num_devices % known:
            raise ValueError(f"mesh shape {shape} does not divide the {num_devices} devices")
        shape = tuple(num_devices // known if s == -1 else s for s in shape)
    if math.prod(shape) != num_devices:
        raise ValueError(
            f"mesh shape {dict(zip(MESH_AXES, shape, strict=True))} needs {math.prod(shape)} "
            f"devices but {num_devices} are present; set --config.mesh.shape, e.g. (-1, 1, 1)"
        )
    return shape  # type: ignore[return-value]


def make_mesh(shape: Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over all (or the given) devices with Auto axes (linen logical constraints need
    them; ``jax.make_mesh`` defaults to Explicit axes on recent jax)."""
    devices = list(jax.devices() if devices is None else devices)
    resolved = resolve_mesh_shape(shape, len(devices))
    axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    if len(devices) == len(jax.devices()):
        return jax.make_mesh(resolved, MESH_AXES, axis_types=axis_types)
    return Mesh(np.asarray(devices).reshape(resolved), MESH_AXES, axis_types=axis_types)


def model_context(mesh: Mesh, rules: Rules) -> contextlib.ExitStack:
    """Mesh + logical rules: every trace of the model must happen inside this (outside it linen's
    activation constraints would resolve against no rules)."""
    stack = contextlib.ExitStack()
    stack.enter_context(jax.set_mesh(mesh))
    stack.enter_context(nn.logical_axis_rules(rules))
    return stack


def batch_shards(mesh: Mesh) -> int:
    """How many ways the batch is split (``data × fsdp``)."""
    return mesh.shape["data"] * mesh.shape["fsdp"]


def check_batch_size(global_batch: int, mesh: Mesh, microbatches: int = 1) -> None:
    """Fail before compiling when the batch cannot be split evenly."""
    shards = batch_shards(mesh)
    if global_batch % microbatches:
        raise ValueError(
            f"batch_size {global_batch} is not divisible by microbatches={microbatches}"
        )
    micro = global_batch // microbatches
    if micro % shards:
        raise ValueError(
            f"batch_size {global_batch} (microbatch {micro}) is not divisible by the "
            f"data-parallel size data×fsdp = {mesh.shape['data']}×{mesh.shape['fsdp']} = {shards}"
        )
    if global_batch % jax.process_count():
        raise ValueError(
            f"batch_size {global_batch} is not divisible by the {jax.process_count()} processes"
        )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where a model runs: a mesh and its logical-axis rules. Training, transfer, evaluation and
    the input pipeline all take one of these instead of carrying mesh and rules separately."""

    mesh: Mesh
    rules: Rules

    @classmethod
    def from_config(
        cls, mesh_config: Any, devices: Sequence[jax.Device] | None = None
    ) -> Placement:
        """From ``config.mesh`` (``shape`` and ``rules``)."""
        return cls(make_mesh(mesh_config.shape, devices), logical_rules(mesh_config.rules))

    @property
    def batch_sharding(self) -> NamedSharding:
        """Leading (batch) dimension split over ``data × fsdp``."""
        return batch_sharding(self.mesh)

    @property
    def replicated(self) -> NamedSharding:
        return replicated(self.mesh)

    @property
    def num_devices(self) -> int:
        return self.mesh.size

    def context(self) -> contextlib.ExitStack:
        """Mesh + rules, for tracing the model (see ``model_context``)."""
        return model_context(self.mesh, self.rules)

    def shardings(self, abstract_boxed: Any) -> Any:
        """Where each leaf of a boxed tree (e.g. ``jax.eval_shape`` of an init) lives."""
        return shardings_from_boxed(abstract_boxed, self.mesh, self.rules)

    def abstract(self, abstract_boxed: Any) -> tuple[Any, Any]:
        """``(ShapeDtypeStructs carrying their shardings, the shardings)`` of a boxed tree: the
        target that a checkpoint is restored into and a state is created in."""
        shardings = self.shardings(abstract_boxed)
        abstract = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
            nn.unbox(abstract_boxed),
            shardings,
        )
        return abstract, shardings


def _fit(spec: PartitionSpec, shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """Drop the mesh axes of any dimension they do not divide (e.g. 3 heads on 2 tensor shards):
    that dimension is replicated instead of failing to compile."""
    fitted = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=True):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        size = math.prod(mesh.shape[a] for a in names)
        fitted.append(axes if dim % size == 0 else None)
    return PartitionSpec(*fitted)


def shardings_from_boxed(abstract_boxed: Any, mesh: Mesh, rules: Rules) -> Any:
    """NamedShardings for a tree whose leaves may be ``nn.Partitioned`` boxes (logical names);
    unboxed leaves are replicated, and dimensions the mesh does not divide are replicated."""
    specs = nn.get_partition_spec(abstract_boxed)
    named = nn.logical_to_mesh_sharding(specs, mesh, rules)
    shapes = nn.unbox(abstract_boxed)
    return jax.tree.map(
        lambda s, x: NamedSharding(mesh, _fit(s.spec, tuple(x.shape), mesh)), named, shapes
    )
