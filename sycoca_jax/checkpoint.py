"""Orbax checkpoints: train state + data-iterator state + config in one step, async.

Layout: ``<workdir>/checkpoints/<step>/{state,data,config}``. ``restore`` puts arrays straight
into the target shardings; ``load_params`` restores only a subtree of the parameters (e.g. the
image tower) for transfer, without reading the rest.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

CHECKPOINT_DIR = "checkpoints"


class IncompatibleCheckpointError(ValueError):
    """The checkpoint's parameters do not fit the model the config builds."""


def _handlers() -> dict[str, Any]:
    # Imported where used: the data-iterator state needs grain, which a bare accelerator host
    # (tools.benchmark) does not have.
    from sycoca_jax.data import iterator_state

    return {
        "state": ocp.StandardCheckpointHandler(),
        "data": iterator_state.DataStateHandler(),  # grain's, resumable on another layout
        "config": ocp.JsonCheckpointHandler(),
    }


def checkpoint_dir(path: str) -> epath.Path:
    """Accept a workdir or its ``checkpoints`` folder."""
    path = epath.Path(path)
    return path / CHECKPOINT_DIR if (path / CHECKPOINT_DIR).exists() else path


def _flat_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {
        "/".join(str(getattr(k, "key", k)) for k in path): tuple(leaf.shape) for path, leaf in flat
    }


def describe_mismatch(expected: Any, found: Any, limit: int = 12) -> str:
    """Human-readable differences between two trees of shapes (empty when they agree)."""
    want, have = _flat_shapes(expected), _flat_shapes(found)
    lines = []
    for name in sorted(set(want) | set(have)):
        if name not in have:
            lines.append(f"  {name}: missing from the checkpoint (model wants {want[name]})")
        elif name not in want:
            lines.append(f"  {name}: in the checkpoint {have[name]} but not in the model")
        elif want[name] != have[name]:
            lines.append(f"  {name}: checkpoint {have[name]} vs model {want[name]}")
    if len(lines) > limit:
        lines = lines[:limit] + [f"  ... and {len(lines) - limit} more"]
    return "\n".join(lines)


class Checkpointer:
    """A thin wrapper over ``ocp.CheckpointManager`` with the three items this project saves."""

    def __init__(self, workdir: str, max_to_keep: int | None = 3, async_save: bool = True):
        self.directory = epath.Path(workdir) / CHECKPOINT_DIR
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=True
            ),
            item_handlers=_handlers(),
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> Sequence[int]:
        return self._manager.all_steps()

    def save(
        self,
        step: int,
        state: Any,
        data_iterator: Any | None = None,
        config: Any | None = None,
        force: bool = False,
    ) -> bool:
        items = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:
            from sycoca_jax.data import iterator_state

            items["data"] = iterator_state.DataStateSave(data_iterator)
        if config is not None:
            items["config"] = ocp.args.JsonSave(
                config.to_dict() if hasattr(config, "to_dict") else config
            )
        return self._manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(self, step: int, abstract_state: Any, data_iterator: Any | None = None) -> Any:
        """Restore into ``abstract_state``'s shapes and shardings (``ShapeDtypeStruct`` leaves
        carrying ``.sharding``); ``data_iterator`` is restored in place."""
        found = self._manager.item_metadata(step)["state"]
        mismatch = describe_mismatch(abstract_state["params"], found["params"])
        if mismatch:
            raise IncompatibleCheckpointError(
                f"checkpoint {self.directory / str(step)} does not fit this config's model:\n"
                f"{mismatch}"
            )
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
            from sycoca_jax.data import iterator_state

            items["data"] = iterator_state.DataStateRestore(data_iterator)
        return self._manager.restore(step, args=ocp.args.Composite(**items))["state"]

    def restore_config(self, step: int) -> dict[str, Any]:
        return self._manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))[
            "config"
        ]

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()


def _pick(tree: Any, path: Sequence[str], what: str) -> Any:
    for key in path:
        if not isinstance(tree, dict) or key not in tree:
            known = sorted(tree) if isinstance(tree, dict) else []
            raise KeyError(f"{what} has no {'/'.join(path)!r} (at {key!r}; known: {known})")
        tree = tree[key]
    return tree


def _reader(path: str) -> tuple[ocp.CheckpointManager, epath.Path]:
    directory = checkpoint_dir(path)
    # The state is written by StandardCheckpointHandler; its on-disk format is the PyTree one,
    # whose handler supports partial restore.
    manager = ocp.CheckpointManager(
        directory,
        options=ocp.CheckpointManagerOptions(read_only=True),
        item_handlers={**_handlers(), "state": ocp.PyTreeCheckpointHandler()},
    )
    return manager, directory


def params_metadata(path: str, step: int | None = None) -> tuple[int, Any]:
    """(step, tree of array metadata with ``.shape``/``.dtype``) of a checkpoint's parameters,
    read without loading any array; ``step`` defaults to the latest."""
    manager, directory = _reader(path)
    try:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint under {directory}")
        return step, manager.item_metadata(step)["state"]["params"]
    finally:
        manager.close()


def load_params(
    path: str, subtree: Sequence[str] | str = (), step: int | None = None, sharding: Any = None
) -> Any:
    """Parameters (or the subtree at ``subtree``, e.g. ``"image_encoder"``) of a checkpoint.

    ``path`` is a workdir or its ``checkpoints`` folder; ``step`` defaults to the latest. Only the
    requested arrays are read. ``sharding`` places them: one ``jax.sharding.Sharding`` for every
    array, or a tree of them matching the (sub)tree; default: host numpy arrays.
    """
    subtree = (subtree,) if isinstance(subtree, str) else tuple(subtree)
    step, metadata = params_metadata(path, step)
    manager, directory = _reader(path)
    wanted = _pick(metadata, subtree, f"checkpoint {directory / str(step)}")
    shardings = (
        jax.tree.map(lambda _: sharding, wanted)
        if sharding is None or isinstance(sharding, jax.sharding.Sharding)
        else sharding
    )

    def restore_arg(meta, where):
        if where is None:
            return ocp.RestoreArgs(restore_type=np.ndarray)
        return ocp.ArrayRestoreArgs(sharding=where, global_shape=meta.shape, dtype=meta.dtype)

    restore_args = jax.tree.map(restore_arg, wanted, shardings, is_leaf=lambda x: x is None)
    target, args = wanted, restore_args
    for key in reversed(("params",) + subtree):
        target, args = {key: target}, {key: args}
    try:
        restored = manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(item=target, restore_args=args, partial_restore=True)
            ),
        )["state"]
    finally:
        manager.close()
    return _pick(restored["params"], subtree, "restored state")


def params_digest(params: Any) -> str:
    """SHA-256 over every parameter's path, dtype, shape and bytes: equal params ⇔ equal digest."""
    import hashlib

    digest = hashlib.sha256()
    flat = jax.tree_util.tree_flatten_with_path(jax.device_get(params))[0]
    for path, leaf in sorted(flat, key=lambda item: jax.tree_util.keystr(item[0])):
        array = np.ascontiguousarray(np.asarray(leaf))
        digest.update(jax.tree_util.keystr(path).encode())
        digest.update(f"{array.dtype}{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()
