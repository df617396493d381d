"""``<workdir>/eval_results.json``: each evaluation entry's latest results, never lost.

Process 0 writes a whole new file next to the old one and renames it over it (through
``etils.epath``, so ``gs://`` works): a crash mid-write leaves the previous results, never a torn
file. An old file that is not a JSON object (torn by an older version, a full disk) is kept as
``eval_results.json.corrupt`` and replaced. ``check_writable`` fails before any metric is computed
when the workdir cannot take the file.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import jax
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

RESULTS_FILE = "eval_results.json"


def _probe(workdir: str) -> str | None:
    """Why ``workdir`` cannot take a new file (None when it can)."""
    directory = epath.Path(workdir)
    probe = directory / f".{RESULTS_FILE}.probe-{uuid.uuid4().hex}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe.write_text("")
        probe.unlink()
    except Exception as e:  # OSError locally; the GCS backends raise their own types
        return f"{type(e).__name__}: {e}"
    return None


def check_writable(workdir: str) -> None:
    """Raises ``PermissionError`` on every process when process 0 cannot write the results file
    into ``workdir`` (created if missing)."""
    problem = _probe(workdir) if jax.process_index() == 0 else None
    failed = problem is not None
    if jax.process_count() > 1:
        failed = bool(multihost_utils.broadcast_one_to_all(np.int32(failed)))
    if failed:
        raise PermissionError(
            f"cannot write {RESULTS_FILE} into {workdir} "
            f"({problem or 'see process 0'}); choose a writable --workdir"
        )


def _free_name(path: epath.Path) -> epath.Path:
    """``path``, or ``path.1``, ``path.2``, ... whichever does not exist yet."""
    candidate, n = path, 0
    while candidate.exists():
        n += 1
        candidate = path.parent / f"{path.name}.{n}"
    return candidate


def read_results(path: epath.Path) -> dict[str, Any]:
    """The results stored at ``path`` ({} when there are none). A file that is not a JSON
    object is renamed to ``<name>.corrupt`` (kept, never deleted) and {} returned."""
    if not path.exists():
        return {}
    try:
        stored = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        stored, why = None, str(e)
    else:
        why = f"holds a {type(stored).__name__}, not an object"
    if isinstance(stored, dict):
        return stored
    kept = _free_name(path.parent / f"{path.name}.corrupt")
    path.rename(kept)
    logging.warning("%s is unreadable (%s); kept it as %s and start a new one", path, why, kept)
    return {}


def write_results(workdir: str, step: int, results: dict[str, dict[str, Any]]) -> None:
    """Merges ``results`` (``{entry: {metric: value}}``) into ``<workdir>/eval_results.json``,
    each entry with its step, and the file's latest ``step`` (process 0 writes; atomic)."""
    if jax.process_index() != 0:
        return
    path = epath.Path(workdir) / RESULTS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    merged = read_results(path)
    merged.update({name: {**metrics, "step": int(step)} for name, metrics in results.items()})
    merged["step"] = int(step)
    text = json.dumps(merged, indent=2, default=str) + "\n"
    temporary = path.parent / f".{RESULTS_FILE}.tmp-{uuid.uuid4().hex}"
    try:
        temporary.write_text(text)
        temporary.replace(path)
    finally:
        if temporary.exists():
            temporary.unlink()
