"""The data-iterator item of a checkpoint: grain's Orbax handler (one
``process_<i>-of-<n>.json`` per process), which also restores a state saved by another number of
processes. The training stream's position is global (``stream``), so the iterator merges the
saved per-process states into its own (``resume_state(saved_states, process_index,
process_count)``); an iterator without that method is refused in one line.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

_STATE_FILE = re.compile(r"process_(\d+)-of-(\d+)\.json")


class DataStateHandler(grain.checkpoint.CheckpointHandler):
    """Saves as grain does; restores this process's own file, else merges another layout's."""

    def restore(self, directory: epath.Path, item: Any = None, args: Any = None) -> Any:
        item = item or args.item
        index, count = jax.process_index(), jax.process_count()
        directory = epath.Path(directory)
        if (directory / f"process_{index}-of-{count}.json").exists():
            return super().restore(directory, item=item)
        saved = saved_states(directory)
        merge = getattr(item, "resume_state", None)
        if merge is None:
            raise ValueError(
                f"the data-iterator state in {directory} was saved by {len(saved)} processes and "
                f"this iterator cannot be resumed on {count}; resume on {len(saved)} processes"
            )
        logging.info("data stream: resuming a state saved by %d processes on %d", len(saved), count)
        item.set_state(merge(saved, index, count))
        item.start_prefetch()
        return item


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp.args.CheckpointArgs):
    item: Any


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
    item: Any


def saved_states(directory: epath.Path) -> list[dict[str, Any]]:
    """Every process's saved state, in process order; one line when they are incomplete."""
    found: dict[int, dict[int, epath.Path]] = {}
    for path in epath.Path(directory).iterdir():
        if match := _STATE_FILE.fullmatch(path.name):
            found.setdefault(int(match.group(2)), {})[int(match.group(1))] = path
    if len(found) != 1:
        raise ValueError(
            f"{directory} holds data-iterator states of {sorted(found) or 'no'} process counts; "
            "expected the files of exactly one (process_<i>-of-<n>.json)"
        )
    [(count, files)] = found.items()
    if sorted(files) != list(range(count)):
        raise ValueError(
            f"{directory} lacks the data-iterator state of processes "
            f"{sorted(set(range(count)) - set(files))} of {count}"
        )
    return [json.loads(files[i].read_text()) for i in range(count)]
