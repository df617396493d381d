"""Orbax checkpoints: train state + data-iterator state + config in one step, async.

Layout: ``<workdir>/checkpoints/<step>/{state,data,config,checksums,history}``. ``restore`` puts
arrays straight into the target shardings; ``load_params`` restores only a subtree of the
parameters (e.g. the image tower) for transfer, without reading the rest.

Damage never goes unnoticed: every step carries a checksum of each array of the state
(``checksums``, see ``sycoca_jax.checksums``), checked after restoring. ``restore_latest`` tries
the newest step and, when it cannot be read or fails its checksums, logs why and tries the next
older one; the damaged steps are moved to ``checkpoints/damaged/`` (nothing is deleted). It never
starts a run from scratch while checkpoints exist: if none can be read it raises, listing each
step and why. Those rules and their errors are ``checkpoint_integrity``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from sycoca_jax import checkpoint_integrity as integrity
from sycoca_jax import checksums
from sycoca_jax.errors import UserError

CHECKPOINT_DIR = "checkpoints"


class IncompatibleCheckpointError(UserError, ValueError):
    """The checkpoint's parameters do not fit the model the config builds."""


class CheckpointNotFoundError(UserError, FileNotFoundError):
    """No checkpoint where the user pointed."""


def _handlers() -> dict[str, Any]:
    # Imported where used: the data-iterator state needs grain, which a bare accelerator host
    # (tools.benchmark) does not have.
    from sycoca_jax.data import iterator_state

    return {
        "state": ocp.StandardCheckpointHandler(),
        "data": iterator_state.DataStateHandler(),  # grain's, resumable on another layout
        "config": ocp.JsonCheckpointHandler(),
        checksums.ITEM: ocp.JsonCheckpointHandler(),
        "history": ocp.JsonCheckpointHandler(),
    }


def checkpoint_dir(path: str) -> epath.Path:
    """Accept a workdir or its ``checkpoints`` folder."""
    path = epath.Path(path)
    return path / CHECKPOINT_DIR if (path / CHECKPOINT_DIR).exists() else path


def locate(path: str) -> tuple[epath.Path, int | None]:
    """(checkpoints folder, step or None) for a workdir, its ``checkpoints`` folder or one step
    folder; raises ``CheckpointNotFoundError`` (creating nothing) when ``path`` holds none."""
    given = epath.Path(path)
    if given.name.isdigit() and given.is_dir() and given.parent.exists():
        return given.parent, int(given.name)
    directory = checkpoint_dir(path)
    if not directory.is_dir() or not any(p.name.isdigit() for p in directory.iterdir()):
        raise CheckpointNotFoundError(
            f"no checkpoint at {path} (expected a workdir, its {CHECKPOINT_DIR}/ folder or one "
            f"step folder {CHECKPOINT_DIR}/<step>)"
        )
    return directory, None


@dataclasses.dataclass(frozen=True)
class Restored:
    """What ``restore_latest`` found: the step, its state and its saved config (or None)."""

    step: int
    state: Any
    config: dict[str, Any] | None


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
    """A thin wrapper over ``ocp.CheckpointManager`` with the items this project saves.

    ``history`` is a list of JSON records (e.g. the config changes accepted on each resume),
    restored with a step by ``restore_latest``, extended with ``note`` and saved with every step.
    """

    def __init__(self, workdir: str, max_to_keep: int | None = 3, async_save: bool = True):
        self.directory = epath.Path(workdir) / CHECKPOINT_DIR
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=True
            ),
            item_handlers=_handlers(),
        )
        self.history: list[dict[str, Any]] = []

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> Sequence[int]:
        return self._manager.all_steps()

    def note(self, record: dict[str, Any]) -> None:
        """Add ``record`` to the history saved with every following step."""
        self.history.append(record)

    def save(
        self,
        step: int,
        state: Any,
        data_iterator: Any | None = None,
        config: Any | None = None,
        force: bool = False,
    ) -> bool:
        items = {
            "state": ocp.args.StandardSave(state),
            checksums.ITEM: ocp.args.JsonSave(checksums.of_tree(state)),
        }
        if data_iterator is not None:
            from sycoca_jax.data import iterator_state

            items["data"] = iterator_state.DataStateSave(data_iterator)
        if config is not None:
            items["config"] = ocp.args.JsonSave(
                config.to_dict() if hasattr(config, "to_dict") else config
            )
        if self.history:
            items["history"] = ocp.args.JsonSave(list(self.history))
        return self._manager.save(step, args=ocp.args.Composite(**items), force=force)

    def _has_item(self, step: int, item: str) -> bool:
        return (self.directory / str(step) / item).exists()

    def _read(self, step: int, item: str, args: Any) -> Any:
        """One item of one step through its handler alone: a process reads only its own files
        and meets no other process (the manager's restore holds barriers, which a process that
        failed alone would leave the others waiting in)."""
        handler = _handlers()[item]
        try:
            return handler.restore(self.directory / str(step) / item, args=args)
        finally:
            if hasattr(handler, "close"):
                handler.close()

    def restore(self, step: int, abstract_state: Any, data_iterator: Any | None = None) -> Any:
        """Restore into ``abstract_state``'s shapes and shardings (``ShapeDtypeStruct`` leaves
        carrying ``.sharding``) and check the arrays against the step's checksums;
        ``data_iterator`` is restored in place.

        Each process reads its own part alone; they then agree whether all succeeded before
        the (collective) checksum check, so a part only one process cannot read fails the step
        on every process alike instead of leaving the others waiting."""
        failure = None
        try:
            state, manifest = self._restore_here(step, abstract_state, data_iterator)
        except IncompatibleCheckpointError:  # read from the shared metadata: same everywhere
            raise
        except Exception as error:
            failure = error
        if not integrity.every_process(failure is None):
            if failure is not None:
                raise failure
            raise integrity.CheckpointDamagedError(
                f"step {step}: another process could not read its part"
            )
        integrity.verify(step, manifest, state)
        return state

    def _restore_here(
        self, step: int, abstract_state: Any, data_iterator: Any | None
    ) -> tuple[Any, dict[str, Any] | None]:
        """This process's part of a step (no collective): (state, checksum manifest or None)."""
        if not self._has_item(step, "state"):
            raise integrity.CheckpointDamagedError(
                f"step {step} has no state (an empty or partial folder)"
            )
        handler = ocp.StandardCheckpointHandler()
        try:
            found = handler.metadata(self.directory / str(step) / "state")
        finally:
            handler.close()
        if found is None or "params" not in found:
            raise integrity.CheckpointDamagedError(f"step {step} has no readable state metadata")
        mismatch = describe_mismatch(abstract_state["params"], found["params"])
        if mismatch:
            raise IncompatibleCheckpointError(
                f"checkpoint {self.directory / str(step)} does not fit this config's model:\n"
                f"{mismatch}"
            )
        manifest = self._restore_json(step, checksums.ITEM)
        state = self._read(step, "state", ocp.args.StandardRestore(abstract_state))
        if data_iterator is not None:
            from sycoca_jax.data import iterator_state

            self._read(step, "data", iterator_state.DataStateRestore(data_iterator))
        return state, manifest

    def restore_config(self, step: int) -> dict[str, Any]:
        return self._read(step, "config", ocp.args.JsonRestore())

    def _restore_json(self, step: int, item: str) -> Any:
        if not self._has_item(step, item):
            return None
        return self._read(step, item, ocp.args.JsonRestore())

    def restore_latest(
        self,
        abstract_state: Any,
        data_iterator: Any | None = None,
        check_config: Callable[[dict[str, Any] | None], Any] | None = None,
        set_aside: bool = True,
    ) -> Restored | None:
        """The newest step that restores and passes its checksums; None if there is no step.

        A step that fails is logged in one line (step and cause) and the next older one is
        tried; with ``set_aside`` the failed newer steps are then moved to ``damaged/`` so the
        run can save those steps again. ``check_config(saved_config)`` runs before a step's
        state is read; what it raises (a refused config change) propagates, as does
        ``IncompatibleCheckpointError``. All steps unreadable: ``NoUsableCheckpointError``.
        """
        failures: list[tuple[int, str]] = []

        def failed(step: int, cause: str) -> None:
            failures.append((step, cause))
            logging.warning(
                "checkpoint step %d cannot be restored (%s); trying the previous step", step, cause
            )

        # Every process takes the same path through this loop: each outcome is agreed on (or
        # read from files all processes share) before the next collective.
        for step in sorted(self.all_steps(), reverse=True):
            config, history, cause = None, None, None
            try:
                config = self._restore_json(step, "config")
                history = self._restore_json(step, "history")
            except Exception as error:
                cause = f"config: {integrity.cause(error)}"
            if not integrity.every_process(cause is None):
                failed(step, cause or "another process could not read its config")
                continue
            if check_config is not None:
                check_config(config)
            try:
                state = self.restore(step, abstract_state, data_iterator)
            except IncompatibleCheckpointError:
                raise
            except Exception as error:
                failed(step, integrity.cause(error))
                continue
            if failures and set_aside:
                self._set_aside([s for s, _ in failures])
            self.history = list(history or [])
            return Restored(step, state, config)
        if failures:
            listing = "; ".join(f"step {s}: {c}" for s, c in failures)
            raise integrity.NoUsableCheckpointError(
                f"no checkpoint under {self.directory} can be restored ({listing}). Repair or "
                f"move them away to start afresh, or point --workdir elsewhere"
            )
        return None

    def _set_aside(self, steps: Sequence[int]) -> None:
        """Move damaged steps to ``damaged/`` (``checkpoint_integrity.set_aside``), then let every
        process see the remaining ones."""
        integrity.set_aside(self.directory, steps)
        self._manager.reload()

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
    if not directory.is_dir():
        raise CheckpointNotFoundError(f"no checkpoint under {path} (no such folder)")
    # The state is written by StandardCheckpointHandler; its on-disk format is the PyTree one,
    # whose handler supports partial restore.
    manager = ocp.CheckpointManager(
        directory,
        options=ocp.CheckpointManagerOptions(read_only=True, save_interval_steps=0, create=False),
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
            raise CheckpointNotFoundError(f"no checkpoint under {directory}")
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
    items = {"state": ocp.args.PyTreeRestore(item=target, restore_args=args, partial_restore=True)}
    has_sums = (directory / str(step) / checksums.ITEM).exists()
    if has_sums:
        items[checksums.ITEM] = ocp.args.JsonRestore()
    try:
        restored = manager.restore(step, args=ocp.args.Composite(**items))
    finally:
        manager.close()
    if has_sums:
        bad = checksums.mismatches(restored[checksums.ITEM], restored["state"])
        if bad:
            raise integrity.CheckpointDamagedError(
                f"checkpoint {directory / str(step)}: checksum mismatch in {bad}"
            )
    return _pick(restored["state"]["params"], subtree, "restored state")
