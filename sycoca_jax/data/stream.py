"""The training stream: a function of the config, never of the process layout.

Position ``g = 0, 1, 2, ...`` in the global stream holds record ``order_e[g mod N]`` of epoch
``e = g // N`` (``order_e``: a permutation of the ``N`` records drawn from (seed, epoch)). Every
random choice made for that example (crop, caption, any step's randomness) draws from a generator
seeded by (seed, epoch, record index), one per step. A bad record is counted and replaced by a
record drawn from (seed, g, attempt), so each position holds exactly one example whatever fails.

Global batch ``s`` is positions ``[s*B, (s+1)*B)``; process ``p`` of ``P`` reads rows
``[p*b, (p+1)*b)`` of it (``b = B / P``), the rows its devices hold in the global array. So
2 processes x 4 devices train on exactly the batches of 1 x 8, and the reading position is one
number, ``s*B`` examples: a state saved by any number of processes resumes on any other
(``SkipCountingIterator.resume_state`` merges the saved per-process states;
``iterator_state.DataStateHandler`` reads them from a checkpoint).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np
from absl import flags
from grain import experimental as grain_experimental

from sycoca_jax.data.skipping import (
    SKIP_REASONS,
    SKIPPED_KEY,
    SkippedRecord,
    TooManySkippedError,
)

PREFETCH_KINDS = ("thread", "process")
MAX_ATTEMPTS = 1000  # records tried for one position before the data is declared broken
_ENDLESS_STEPS = 2**40  # "forever", in global batches
# Purposes of the random generators, so that no two uses share a stream.
_ORDER, _REPLACE, _STEP = 1, 2, 3


def _generator(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in key]))


@dataclasses.dataclass(frozen=True)
class Layout:
    """Which rows of each global batch this process reads (``pipeline.process_slice`` and
    ``pipeline.per_process_batch_size`` check the numbers)."""

    global_batch_size: int
    process_index: int = 0
    process_count: int = 1

    @property
    def batch_size(self) -> int:
        return self.global_batch_size // self.process_count

    def position(self, local_index: int) -> int:
        """The global stream position of this process's ``local_index``-th example."""
        step, row = divmod(local_index, self.batch_size)
        return step * self.global_batch_size + self.process_index * self.batch_size + row


class Order:
    """Which record each stream position holds: a fresh permutation per epoch."""

    def __init__(self, num_records: int, seed: int):
        if num_records < 1:
            raise ValueError("the training split has no records")
        self.num_records, self.seed = num_records, seed
        self._epoch: tuple[int, grain.MapDataset] | None = None

    def record(self, position: int) -> tuple[int, int]:
        """``(epoch, record index)`` at ``position``."""
        epoch, offset = divmod(position, self.num_records)
        cached = self._epoch
        if cached is None or cached[0] != epoch:
            seed = int(np.random.SeedSequence([_ORDER, self.seed, epoch]).generate_state(1)[0])
            cached = (epoch, grain.MapDataset.range(self.num_records).shuffle(seed=seed))
            self._epoch = cached
        return epoch, int(cached[1][offset])

    def replacement(self, position: int, attempt: int) -> int:
        """The record tried at ``position`` after ``attempt`` bad ones."""
        return int(_generator(_REPLACE, self.seed, position, attempt).integers(self.num_records))


class ExampleAt(grain.transforms.Map):
    """Local example index -> the processed example at its stream position, with ``SKIPPED_KEY``
    counting the bad records met (and replaced) on the way."""

    def __init__(
        self,
        source: Sequence[Any],
        steps: Sequence[grain.transforms.Map | grain.transforms.RandomMap],
        order: Order,
        layout: Layout,
    ):
        self.source, self.steps, self.order, self.layout = source, tuple(steps), order, layout

    def map(self, local_index: int) -> dict[str, Any]:
        position = self.layout.position(local_index)
        counts = np.zeros((len(SKIP_REASONS),), np.int32)
        epoch, record = self.order.record(position)
        for attempt in range(MAX_ATTEMPTS):
            if attempt:
                record = self.order.replacement(position, attempt)
            element = self._process(self.source[record], epoch, record, attempt)
            if not isinstance(element, SkippedRecord):
                return {**element, SKIPPED_KEY: counts}
            counts[SKIP_REASONS.index(element.reason)] += 1
        raise TooManySkippedError(
            f"{MAX_ATTEMPTS} records in a row were bad "
            f"({dict(zip(SKIP_REASONS, counts.tolist(), strict=True))}); the dataset looks "
            "broken. Re-run the converter (python -m sycoca_jax.data.prepare) or check "
            "config.data.min_image_size."
        )

    def _process(self, element: Any, epoch: int, record: int, attempt: int) -> Any:
        for index, step in enumerate(self.steps):
            if isinstance(step, grain.transforms.RandomMap):
                rng = _generator(_STEP, self.order.seed, epoch, record, attempt, index)
                element = step.random_map(element, rng)
            else:
                element = step.map(element)
        return element


@dataclasses.dataclass(frozen=True)
class Reading:
    """How the stream is read: ``num_workers`` threads or processes (``prefetch``), each
    buffering ``buffer_size`` batches ahead. The batches do not depend on it."""

    num_workers: int = 0
    prefetch: str = "thread"
    buffer_size: int = 2

    def __post_init__(self):
        if self.prefetch not in PREFETCH_KINDS:
            raise ValueError(f"prefetch must be one of {PREFETCH_KINDS}, got {self.prefetch!r}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")


class TrainStream(grain.IterDataset):
    """This process's batches of the global stream (module docstring); its iterator's state is
    the global position, restorable on any process layout."""

    def __init__(
        self,
        source: Sequence[Any],
        steps: Sequence[grain.transforms.Map | grain.transforms.RandomMap],
        *,
        seed: int,
        layout: Layout,
        num_epochs: int | None = None,
        reading: Reading = Reading(),
    ):
        super().__init__()
        self.layout, self.reading = layout, reading
        self.order = Order(len(source), seed)
        self._example = ExampleAt(source, steps, self.order, layout)
        if num_epochs is None:
            self.num_steps = _ENDLESS_STEPS
        else:  # global batches; the last, partial one is dropped
            self.num_steps = num_epochs * len(source) // layout.global_batch_size

    def batches(self, start_step: int) -> grain.IterDataset:
        """The grain pipeline of this process's batches from global batch ``start_step`` on."""
        b = self.layout.batch_size
        examples = grain.MapDataset.range(start_step * b, self.num_steps * b).map(self._example)
        reading = self.reading
        if reading.prefetch == "process" and reading.num_workers:
            # grain reads absl flags when it starts workers; outside an absl app (notebooks,
            # tests) nothing has parsed them, which grain reports as an error.
            if not flags.FLAGS.is_parsed():
                flags.FLAGS.mark_as_parsed()
            options = grain.MultiprocessingOptions(
                num_workers=reading.num_workers, per_worker_buffer_size=reading.buffer_size
            )
            # Whole batches per worker, collected round-robin: the order ignores num_workers.
            return examples.batch(b).to_iter_dataset().mp_prefetch(options)
        threads = reading.num_workers
        read_options = grain.ReadOptions(
            num_threads=threads, prefetch_buffer_size=2 * b if threads else 0
        )
        batches = examples.to_iter_dataset(read_options).batch(b)
        if not threads:
            return batches
        return grain_experimental.ThreadPrefetchIterDataset(
            batches, prefetch_buffer_size=reading.buffer_size
        )

    def __iter__(self) -> StreamIterator:
        return StreamIterator(self)

    def __str__(self) -> str:
        return f"TrainStream({self.layout}, {self.reading})"


class StreamIterator(grain.DatasetIterator):
    """Batches of a ``TrainStream``; state ``{"position": examples read by all processes}``."""

    def __init__(self, stream: TrainStream):
        super().__init__()
        self._stream = stream
        self._step = 0
        self._batches: grain.DatasetIterator | None = None

    def _reader(self) -> grain.DatasetIterator:
        if self._batches is None:
            self._batches = iter(self._stream.batches(self._step))
        return self._batches

    def __next__(self) -> dict[str, np.ndarray]:
        if self._step >= self._stream.num_steps:
            raise StopIteration
        batch = next(self._reader())
        self._step += 1
        return batch

    def start_prefetch(self) -> None:
        self._reader().start_prefetch()

    def get_state(self) -> dict[str, Any]:
        return {"position": self._step * self._stream.layout.global_batch_size}

    def set_state(self, state: dict[str, Any]) -> None:
        position = int(state["position"])
        global_batch = self._stream.layout.global_batch_size
        if position % global_batch:
            raise ValueError(
                f"the saved data position ({position} examples) is not a whole number of global "
                f"batches of {global_batch}; resume with the batch size it was saved with"
            )
        self._drop_reader()
        self._step = position // global_batch

    def legacy_state(self, examples: int) -> dict[str, Any]:
        """A state saved before positions were global (per-process grain state and ``examples``
        delivered by this process): the same position in this stream."""
        return {"position": examples * self._stream.layout.process_count}

    def _drop_reader(self) -> None:
        if self._batches is not None:
            self._batches.close()
            self._batches = None

    def close(self) -> None:
        self._drop_reader()

    def __str__(self) -> str:
        return f"StreamIterator(step={self._step})"
