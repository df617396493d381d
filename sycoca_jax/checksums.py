"""A 64-bit checksum per array, the same however the array is sharded.

Each element's bits are mixed with its position in the whole array (the murmur3 finaliser) and
the mixed words are summed modulo 2**32 in two independent lanes. Addition is associative and
commutative, so each device sums its own shard (one copy of each: ``replica_id == 0``, a
computation on that device alone, no collective), the host adds the partial sums, and processes
add theirs with one all-gather of the small totals. The checksum is computed where the data lives
(no gather of the arrays, no host copy), equals across meshes and process counts, and can be
compared after restoring into whatever mesh the resumed run uses. Any change to an element's
bits, or elements swapped, changes a lane with probability 1 - 2**-32 each.

A checksum of the saved files would need them read back after every asynchronous save and would
not survive a change of mesh; this one is computed from the state being saved.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

ITEM = "checksums"
VERSION = 1

_GOLDEN = 0x9E3779B9
_MASK = 0xFFFFFFFF


def _fmix(h: jax.Array) -> jax.Array:
    """murmur3's 32-bit finaliser: every input bit affects every output bit."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _words(x: jax.Array) -> jax.Array:
    """The array's bits as uint32 words, elementwise (a trailing axis for 64-bit types)."""
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    size = x.dtype.itemsize
    if size == 4:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    if size < 4:
        unsigned = {1: jnp.uint8, 2: jnp.uint16}[size]
        return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)
    return jax.lax.bitcast_convert_type(x, jnp.uint32)  # (..., size // 4)


def _lanes(block: jax.Array, offsets: list[Any], strides: tuple[int, ...]) -> jax.Array:
    """The two lane sums of one block whose element ``i`` sits at ``offsets + i`` of an array
    with row-major ``strides`` (positions mod 2**32)."""
    words = _words(block)
    position = jnp.zeros(words.shape, jnp.uint32)
    for axis in range(words.ndim):
        iota = jax.lax.broadcasted_iota(jnp.uint32, words.shape, axis)
        start = jnp.asarray(offsets[axis], jnp.uint32) if axis < len(offsets) else 0
        position = position + (iota + start) * jnp.uint32(strides[axis])
    low = _fmix(words ^ _fmix(position + jnp.uint32(_GOLDEN)))
    high = _fmix((words + jnp.uint32(0x7F4A7C15)) ^ _fmix(position * jnp.uint32(_GOLDEN) + 1))
    return jnp.stack([jnp.sum(low, dtype=jnp.uint32), jnp.sum(high, dtype=jnp.uint32)])


def _strides(shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    """Row-major strides (mod 2**32) of the array's words (64-bit types: two per element)."""
    full = tuple(shape) + ((2,) if itemsize == 8 else ())
    strides, step = [], 1
    for size in reversed(full):
        strides.append(step % 2**32)
        step *= size
    return tuple(reversed(strides))


def _axes(entry: Any) -> tuple[str, ...]:
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _per_device(leaf: jax.Array) -> jax.Array | None:
    """(mesh size, 2) lane sums, one row per device, each device summing its own block (zeros
    for a replica), with no communication; None where the sharding does not allow it."""
    sharding = leaf.sharding
    if not isinstance(sharding, jax.sharding.NamedSharding) or leaf.ndim == 0:
        return None
    spec = tuple(sharding.spec) + (None,) * (leaf.ndim - len(sharding.spec))
    sizes = [math.prod(sharding.mesh.shape[a] for a in _axes(entry)) for entry in spec]
    if any(length % size for length, size in zip(leaf.shape, sizes, strict=True)):
        return None
    return _block_program(leaf.shape, leaf.dtype.itemsize, sharding.mesh, spec)(leaf)


@functools.lru_cache(maxsize=256)
def _block_program(shape: tuple[int, ...], itemsize: int, mesh: Any, spec: tuple) -> Any:
    """The jitted per-device sums for one shape, word size, mesh and layout (compiled once)."""
    strides = _strides(shape, itemsize)
    used = {axis for entry in spec for axis in _axes(entry)}

    def block_sums(block):
        offsets = []
        for d, entry in enumerate(spec):
            index = 0
            for axis in _axes(entry):
                index = index * mesh.shape[axis] + jax.lax.axis_index(axis)
            offsets.append(index * block.shape[d])
        first = jnp.bool_(True)  # the first copy of a block replicated over unused axes
        for axis in mesh.axis_names:
            if axis not in used:
                first = first & (jax.lax.axis_index(axis) == 0)
        sums = _lanes(block, offsets, strides)
        return jnp.where(first, sums, jnp.zeros_like(sums))[None]

    mapped = jax.shard_map(
        block_sums,
        mesh=mesh,
        in_specs=jax.sharding.PartitionSpec(*spec),
        out_specs=jax.sharding.PartitionSpec(tuple(mesh.axis_names)),
        check_vma=False,
    )
    return jax.jit(mapped)


@jax.jit
def _whole(array: jax.Array) -> jax.Array:
    return _lanes(array, [], _strides(array.shape, array.dtype.itemsize))


def _checksum_pairs(leaves: list[Any]) -> np.ndarray:
    """(len(leaves), 2) uint32 lane sums, added over devices and processes."""
    results = []
    for leaf in leaves:
        rows = _per_device(leaf) if isinstance(leaf, jax.Array) else None
        results.append(rows if rows is not None else _whole(leaf))
    totals = np.zeros((len(leaves), 2), np.uint64)
    for i, result in enumerate(results):
        if result.ndim == 1:  # computed whole, the same on every process: counted once
            if jax.process_index() == 0:
                totals[i] += np.asarray(jax.device_get(result), np.uint64)
            continue
        for shard in result.addressable_shards:  # the rows of this process's devices
            totals[i] += np.asarray(shard.data, np.uint64).sum(axis=0)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        gathered = multihost_utils.process_allgather((totals & _MASK).astype(np.uint32))
        totals = np.asarray(gathered, np.uint64).sum(axis=0)
    return (totals & _MASK).astype(np.uint32)


def _name(path: Any) -> str:
    """``params/image_encoder/kernel``, ``opt_state/1/0/mu/...`` (dict keys, sequence indices,
    attribute names)."""
    parts = []
    for entry in path:
        for attribute in ("key", "idx", "name"):
            if hasattr(entry, attribute):
                parts.append(str(getattr(entry, attribute)))
                break
        else:
            parts.append(str(entry))
    return "/".join(parts)


def of_tree(tree: Any) -> dict[str, Any]:
    """``{"version", "arrays": {path: {"shape", "dtype", "checksum"}}}`` of a tree of arrays
    (sharded ``jax.Array``s or host arrays). Every process gets the same answer."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    pairs = _checksum_pairs([leaf for _, leaf in flat])
    arrays = {}
    for (path, leaf), (low, high) in zip(flat, pairs, strict=True):
        arrays[_name(path)] = {
            "shape": list(np.shape(leaf)),
            "dtype": str(np.dtype(leaf.dtype)) if hasattr(leaf, "dtype") else type(leaf).__name__,
            "checksum": f"{int(high):08x}{int(low):08x}",
        }
    return {"version": VERSION, "arrays": arrays}


def mismatches(manifest: dict[str, Any], tree: Any) -> str:
    """Names of the arrays of ``tree`` (the saved tree or a part of it, nested alike) whose
    checksum differs from ``manifest`` or which it lacks, as one short line; empty when all
    agree."""
    saved = manifest.get("arrays", {})
    bad = []
    for name, entry in of_tree(tree)["arrays"].items():
        want = saved.get(name)
        if want is None:
            bad.append(f"{name} (not in the manifest)")
        elif want["dtype"] != entry["dtype"] or want["shape"] != entry["shape"]:
            continue  # restored into another dtype or shape on purpose: nothing to compare
        elif want["checksum"] != entry["checksum"]:
            bad.append(name)
    if len(bad) > 4:
        bad = bad[:4] + [f"and {len(bad) - 4} more"]
    return ", ".join(bad)
