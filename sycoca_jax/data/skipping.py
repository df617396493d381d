"""Bad records at load time: skipped, counted by reason, and carried in the data stream.

A transform that meets a bad record raises ``BadRecord(reason)``; the transform wrappers in
``transforms`` turn it into a ``SkippedRecord`` that flows on untouched. The training stream
(``stream.ExampleAt``) replaces it by another record and attaches to the example it delivers how
many bad records it met, per reason (``SKIPPED_KEY``). The counts thus travel inside batches,
through grain worker processes, to ``SkipCountingIterator`` in the training process, which keeps
the running totals (part of its checkpointable state) and stops the run when too many are bad.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

# Index of each reason in the per-example count vectors; conversion uses the same names.
SKIP_REASONS = ("undecodable_image", "image_too_small", "empty_caption", "image_too_large")
SKIPPED_KEY = "skipped"  # per-example counts, shape (len(SKIP_REASONS),)


class BadRecord(Exception):
    """Raised by a transform for a record that cannot be used; ``reason`` in SKIP_REASONS."""

    def __init__(self, reason: str, detail: str = ""):
        if reason not in SKIP_REASONS:
            raise ValueError(f"unknown skip reason {reason!r}; known: {SKIP_REASONS}")
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class SkippedRecord:
    """Stands in the stream for a record a transform rejected."""

    reason: str


class TooManySkippedError(RuntimeError):
    """More than ``max_skipped_fraction`` of the records read were bad."""


@dataclasses.dataclass
class SkipStats:
    """Running totals: examples delivered and records skipped (by reason)."""

    examples: int = 0
    skipped: dict[str, int] = dataclasses.field(
        default_factory=lambda: dict.fromkeys(SKIP_REASONS, 0)
    )

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped.values())

    @property
    def records(self) -> int:
        return self.examples + self.total_skipped

    @property
    def skipped_fraction(self) -> float:
        return self.total_skipped / self.records if self.records else 0.0

    def metrics(self) -> dict[str, float]:
        """Flat numbers for the training metrics line."""
        out = {
            "data/skipped_records": float(self.total_skipped),
            "data/skipped_fraction": self.skipped_fraction,
        }
        out.update({f"data/skipped_{k}": float(v) for k, v in self.skipped.items()})
        return out


class SkipCountingIterator(grain.DatasetIterator):
    """The training iterator: yields batches without the skip counts, keeps the totals in
    ``stats`` (restored with the rest of its state) and raises ``TooManySkippedError`` once the
    skipped fraction exceeds ``max_skipped_fraction`` after at least ``min_records`` records."""

    def __init__(
        self,
        parent: grain.DatasetIterator,
        *,
        max_skipped_fraction: float,
        min_records: int = 1000,
        dataset_name: str = "the dataset",
    ):
        super().__init__(parent)
        self._max_fraction = max_skipped_fraction
        self._min_records = min_records
        self._dataset_name = dataset_name
        self.stats = SkipStats()

    def __next__(self) -> dict[str, np.ndarray]:
        batch = dict(next(self._parent))
        counts = np.asarray(batch.pop(SKIPPED_KEY)).reshape(-1, len(SKIP_REASONS)).sum(axis=0)
        self.stats.examples += len(next(iter(batch.values())))
        for reason, count in zip(SKIP_REASONS, counts.tolist(), strict=True):
            self.stats.skipped[reason] += int(count)
        self._check()
        return batch

    def _check(self) -> None:
        stats = self.stats
        if stats.records >= self._min_records and stats.skipped_fraction > self._max_fraction:
            raise TooManySkippedError(
                f"{stats.total_skipped} of {stats.records} records read from "
                f"{self._dataset_name} were bad ({stats.skipped_fraction:.2%} > "
                f"config.data.max_skipped_fraction={self._max_fraction:.2%}): {stats.skipped}. "
                "Clean the data with `python -m sycoca_jax.data.prepare local ...` (it skips "
                "bad records and reports them) or raise config.data.max_skipped_fraction."
            )

    def get_state(self) -> dict[str, Any]:
        return {
            "pipeline": self._parent.get_state(),
            "examples": self.stats.examples,
            "skipped": dict(self.stats.skipped),
        }

    def set_state(self, state: dict[str, Any]) -> None:
        pipeline = state["pipeline"]
        legacy = getattr(self._parent, "legacy_state", None)
        if legacy is not None and "position" not in pipeline:  # saved before global positions
            pipeline = legacy(int(state["examples"]))
        self._parent.set_state(pipeline)
        skipped = dict.fromkeys(SKIP_REASONS, 0)
        skipped.update({k: int(v) for k, v in state["skipped"].items()})
        self.stats = SkipStats(examples=int(state["examples"]), skipped=skipped)

    def resume_state(
        self, saved: Sequence[dict[str, Any]], process_index: int, process_count: int
    ) -> dict[str, Any]:
        """This process's state from the states ``saved`` by another number of processes: the
        stream position they share, and the skip totals of the saved processes ``i`` with
        ``i % process_count == process_index`` (totals over all processes are kept)."""
        positions = {
            s["pipeline"]["position"] if "position" in s["pipeline"] else None for s in saved
        }
        if None in positions:  # saved before positions were global: each process's examples
            positions = {sum(int(s["examples"]) for s in saved)}
        if len(positions) != 1:
            raise ValueError(
                f"the saved processes stopped at different data positions {sorted(positions)}; "
                "the checkpoint is inconsistent"
            )
        mine = saved[process_index::process_count]
        skipped = {
            reason: sum(int(s["skipped"].get(reason, 0)) for s in mine) for reason in SKIP_REASONS
        }
        return {
            "pipeline": {"position": positions.pop()},
            "examples": sum(int(s["examples"]) for s in mine),
            "skipped": skipped,
        }

    def __str__(self) -> str:
        return f"SkipCountingIterator(max_skipped_fraction={self._max_fraction})"
