"""What happens when a checkpoint step is damaged: the errors that name it, the checksum check
after a restore, the one-line cause logged for it, moving it aside to ``damaged/``, and the
parameter digest that tells two checkpoints' parameters apart.

Apart from ``checkpoint`` so that module holds the Orbax plumbing (items, handlers, readers) and
this one the integrity and recovery rules ``Checkpointer.restore_latest`` applies.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from absl import logging
from etils import epath

from sycoca_jax import checksums
from sycoca_jax.errors import UserError

DAMAGED_DIR = "damaged"


class CheckpointDamagedError(UserError):
    """One step cannot be restored: a file is missing, torn or fails its checksum."""


class NoUsableCheckpointError(UserError):
    """Checkpoints exist but none can be restored."""


def verify(step: int, manifest: dict[str, Any] | None, state: Any) -> None:
    """Check a restored state against its step's checksum manifest (None: an older save, logged
    as not verified); raises ``CheckpointDamagedError`` naming the arrays that differ."""
    if manifest is None:
        logging.warning("checkpoint step %d has no checksums (an older save): not verified", step)
    else:
        bad = checksums.mismatches(manifest, state)
        if bad:
            raise CheckpointDamagedError(f"checksum mismatch in {bad}")


def cause(error: BaseException, limit: int = 300) -> str:
    """An exception as one short line: the innermost cause (the storage layer's own words, e.g.
    which array could not be read), without TensorStore's spec dump."""
    root = error
    while root.__cause__ is not None:
        root = root.__cause__
    text = " ".join(str(root).split()) or "no message"
    for noise in (" [tensorstore_spec=", " See full TensorStore details"):
        text = text.split(noise)[0]
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(root).__name__}: {text}"


def every_process(ok: bool) -> bool:
    """Whether ``ok`` holds on every process (each reads only its own shards)."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.asarray(ok, np.int32))))


def _move(source: epath.Path, target: epath.Path) -> None:
    """Rename a folder; where the store cannot rename folders (object stores), copy it file by
    file and then remove the original."""
    try:
        source.rename(target)
        return
    except OSError:
        pass

    def copy(src: epath.Path, dst: epath.Path) -> None:
        dst.mkdir(parents=True, exist_ok=True)
        for child in src.iterdir():
            if child.is_dir():
                copy(child, dst / child.name)
            else:
                (dst / child.name).write_bytes(child.read_bytes())

    copy(source, target)
    source.rmtree()


def set_aside(directory: epath.Path, steps: Sequence[int]) -> None:
    """Move damaged steps of ``directory`` to ``damaged/<step>-<time>`` (process 0), then wait
    until every process is past the move."""
    if jax.process_index() == 0:
        folder = directory / DAMAGED_DIR
        folder.mkdir(parents=True, exist_ok=True)
        for step in steps:
            target = folder / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
            _move(directory / str(step), target)
            logging.warning("moved damaged checkpoint step %d to %s", step, target)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("sycoca_checkpoint_set_aside")


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
