"""Device prefetch: the next batches are sent to the devices while the current step runs.

``DevicePrefetch`` wraps the training iterator. Each ``next`` returns a batch already placed on
the devices (``pipeline.make_global_batch``, an asynchronous transfer) and then places the
following ones, so up to ``depth`` batches travel host -> device behind the running step instead
of in front of the next one. This works the same on one process and on many: every process
places its own rows of the same global batches.

The checkpointed data position must be the one of the batches the steps consumed, not of those
prefetched: the iterator remembers its parent's state after each batch it drew and reports the
state of the last batch handed out. Restoring a state drops the prefetched batches.
"""

from __future__ import annotations

import collections
from typing import Any

import grain
import jax
import numpy as np

from sycoca_jax import sharding
from sycoca_jax.data import pipeline
from sycoca_jax.data.skipping import SkipStats

HostBatch = dict[str, np.ndarray]
DeviceBatch = dict[str, jax.Array]


class DevicePrefetch(grain.DatasetIterator):
    """Yields ``(host_batch, device_batch)``; ``depth`` 0 places each batch when it is asked for.

    A grain iterator, so the checkpoint's data item (grain's handler) saves and restores it like
    the iterator it wraps.
    """

    def __init__(self, parent: grain.DatasetIterator, placement: sharding.Placement, depth: int):
        super().__init__(parent)
        self._placement = placement
        self._depth = depth
        # (host batch, device batch, the parent's state once that batch was drawn)
        self._queue: collections.deque[tuple[HostBatch, DeviceBatch, Any]] = collections.deque()
        self._consumed_state: Any = None  # None: nothing drawn since the last set_state
        if depth < 0:
            raise ValueError(f"device prefetch depth must be >= 0, got {depth}")

    def _draw(self) -> None:
        host_batch = next(self._parent)
        device_batch = pipeline.make_global_batch(host_batch, self._placement)
        self._queue.append((host_batch, device_batch, self._parent.get_state()))

    def __next__(self) -> tuple[HostBatch, DeviceBatch]:
        if not self._queue:
            self._draw()
        host_batch, device_batch, state = self._queue.popleft()
        self._consumed_state = state
        try:
            while len(self._queue) < self._depth:
                self._draw()
        except StopIteration:
            pass  # the last batches are handed out from the queue
        return host_batch, device_batch

    def get_state(self) -> Any:
        """The parent's state after the last batch handed out (prefetched ones not counted)."""
        if self._consumed_state is None:
            return self._parent.get_state()
        return self._consumed_state

    def set_state(self, state: Any) -> None:
        self._queue.clear()
        self._consumed_state = None
        self._parent.set_state(state)

    def resume_state(self, saved: Any, process_index: int, process_count: int) -> Any:
        """A state saved by another number of processes, merged as the parent merges it."""
        return self._parent.resume_state(saved, process_index, process_count)

    def start_prefetch(self) -> None:
        self._parent.start_prefetch()

    @property
    def stats(self) -> SkipStats:
        """Skip totals of the batches handed out (the parent's stats run ahead by the queue)."""
        state = self.get_state()
        if not isinstance(state, dict) or "examples" not in state:
            return self._parent.stats
        return SkipStats(examples=int(state["examples"]), skipped=dict(state["skipped"]))

    def close(self) -> None:
        self._queue.clear()
        close = getattr(self._parent, "close", None)
        if close is not None:
            close()

    def __str__(self) -> str:
        return f"DevicePrefetch(depth={self._depth})"
