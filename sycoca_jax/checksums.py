"""A 64-bit checksum per array, the same however the array is sharded.

Each element's bits are mixed with its position (the murmur3 finaliser) and the mixed words are
summed modulo 2**32 in two independent lanes. Addition is associative and commutative, so each
device sums its own shard and XLA adds the partial sums: the checksum is computed where the data
lives (no gather, no host copy), equals across meshes and process counts, and is compared after
restoring into whatever mesh the resumed run uses. Any change to an element's bits, or elements
swapped, changes a lane with probability 1 - 2**-32 each.

A checksum of the saved files would need them read back after every asynchronous save and would
not survive a change of mesh; this one is computed from the state being saved.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

ITEM = "checksums"
VERSION = 1

_GOLDEN = 0x9E3779B9


def _fmix(h: jax.Array) -> jax.Array:
    """murmur3's 32-bit finaliser: every input bit affects every output bit."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _words(x: jax.Array) -> jax.Array:
    """The array's bits as uint32 words, elementwise (a trailing axis for 64-bit types)."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    size = x.dtype.itemsize
    if size == 4:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    if size < 4:
        unsigned = {1: jnp.uint8, 2: jnp.uint16}[size]
        return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)
    return jax.lax.bitcast_convert_type(x, jnp.uint32)  # (..., size // 4)


def _position(shape: tuple[int, ...]) -> jax.Array:
    """Each element's row-major index (mod 2**32), built per axis so no axis is reshaped."""
    index = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(len(shape))):
        iota = jax.lax.broadcasted_iota(jnp.uint32, shape, axis)
        index = index + iota * jnp.uint32(stride % 2**32)
        stride *= shape[axis]
    return index


def _array_checksum(x: jax.Array) -> jax.Array:
    words = _words(x)
    position = _position(words.shape)
    low = _fmix(words ^ _fmix(position + jnp.uint32(_GOLDEN)))
    high = _fmix((words + jnp.uint32(0x7F4A7C15)) ^ _fmix(position * jnp.uint32(_GOLDEN) + 1))
    return jnp.stack([jnp.sum(low, dtype=jnp.uint32), jnp.sum(high, dtype=jnp.uint32)])


@jax.jit
def _checksums(tree: Any) -> Any:
    return jax.tree.map(_array_checksum, tree)


def _fetch(value: jax.Array) -> np.ndarray:
    """A checksum pair on the host of every process (the reduction's result is normally
    replicated; if the compiler left it split across processes, gather it)."""
    if isinstance(value, jax.Array) and not (
        value.is_fully_addressable or value.is_fully_replicated
    ):
        from jax.experimental import multihost_utils

        value = multihost_utils.process_allgather(value, tiled=True)
    return np.asarray(value)


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
    # One computation per set of devices (a jitted function's inputs must share one).
    groups: dict[Any, list[int]] = {}
    for i, (_, leaf) in enumerate(flat):
        devices = leaf.sharding.device_set if isinstance(leaf, jax.Array) else None
        groups.setdefault(frozenset(devices) if devices else None, []).append(i)
    sums: list[Any] = [None] * len(flat)
    for members in groups.values():
        for i, value in zip(members, _checksums([flat[i][1] for i in members]), strict=True):
            sums[i] = value
    arrays = {}
    for (path, leaf), value in zip(flat, sums, strict=True):
        low, high = (int(v) for v in _fetch(value))
        arrays[_name(path)] = {
            "shape": list(np.shape(leaf)),
            "dtype": str(np.dtype(leaf.dtype)) if hasattr(leaf, "dtype") else type(leaf).__name__,
            "checksum": f"{high:08x}{low:08x}",
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
