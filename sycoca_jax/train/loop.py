"""The training loop that pretraining and transfer share.

``TrainLoop`` holds a run's workdir resources (checkpointer, metric writer, data iterator) and
runs the steps. Each step takes a batch already placed on the devices (``data``) and runs the
compiled step; the loss terms are checked for NaN/Inf one step late (the host never waits for
the step it has just dispatched) and always before a checkpoint; metrics with throughput and ETA
are logged every ``config.log_every_steps``; a checkpoint (state, data position, config) is
written every ``config.checkpoint_every_steps``, at the last step, and on SIGTERM at a step every
process agrees on, after which the loop leaves; ``evaluate`` runs after the checkpoint, so a
failing evaluator loses no training.

What keeps a run from losing work or resuming the wrong thing, for pretraining and transfer
alike:

- ``TrainLoop.__init__``: the config's fields are checked (``config_checks.validate``, before
  anything is read or compiled), then the workdir's lease is taken (``workdir_lock``: one run per
  workdir; a second one stops with one line naming the holder and ``--force_unlock``), unless the
  caller already holds it for a longer span (``lease=``); ``close`` releases what it took;
- ``TrainLoop.resume``: the newest checkpoint that restores and passes its checksums (damaged
  newer ones are logged and set aside), its saved config diffed against this one
  (``config_diff``: a changed defining field is refused, an accepted or safe change is logged,
  written to ``metrics.jsonl`` and kept in the checkpoint's history), and ``metrics.jsonl``
  truncated past the restored step so each step keeps one record;
- ``TrainLoop._save``: the lease is checked (a run whose workdir was taken over stops without
  writing) and buffered metrics are flushed with each checkpoint.

Where later work plugs in:

- ``TrainLoop.data``: host batch -> device, ``device_prefetch`` batches ahead of the step
  (``prefetch.DevicePrefetch``; the checkpointed data position is that of the batches consumed);
- ``TrainLoop.train_step``: one step (``profile_steps`` traces chosen steps, ``profiling``).
"""

from __future__ import annotations

import dataclasses
import math
import time
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from sycoca_jax import checkpoint as ckpt
from sycoca_jax import config_checks, config_diff, hardware, sharding, workdir_lock
from sycoca_jax.data.skipping import SkipCountingIterator
from sycoca_jax.metrics import MetricWriter
from sycoca_jax.train import preemption, prefetch, profiling, progress

State = dict[str, Any]
HostBatch = dict[str, np.ndarray]
StepFn = Callable[[State, dict[str, jax.Array]], tuple[State, dict[str, jax.Array]]]
# evaluate(step, state, last_step): evaluations after the step's checkpoint.
Evaluate = Callable[[int, State, bool], None]
LogMetrics = Callable[[State], dict[str, jax.Array]]


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or Inf; the run stops without saving the bad state."""


def check_finite(step: int, metrics: dict[str, float]) -> None:
    bad = [k for k, v in metrics.items() if k.startswith("loss") and not math.isfinite(v)]
    if bad:
        term = next((k for k in bad if k != "loss"), "loss")
        raise NonFiniteLossError(
            f"{term} is {metrics[term]} at step {step}; stopping. The last checkpoint (if any) "
            "is untouched. Lower optim.lr, raise optim.warmup_*, or check the data."
        )


def host_metrics(metrics: dict[str, jax.Array]) -> dict[str, float]:
    return {k: float(v) for k, v in jax.device_get(metrics).items()}


def batch_fingerprint(host_batch: HostBatch) -> int:
    """CRC32 of this process's integer entries (captions, labels), in key order: equal across
    runs ⇔ same data order. Images are left out: hashing them costs more than it tells."""
    crc = 0
    for key in sorted(host_batch):
        value = np.asarray(host_batch[key])
        if value.dtype.kind == "i":
            crc = zlib.crc32(np.ascontiguousarray(value).tobytes(), crc)
    return crc


@dataclasses.dataclass(frozen=True)
class Outcome:
    """How ``TrainLoop.run`` ended: the state, the last logged metrics, and whether a stop
    request (SIGTERM) ended it (the state is then saved; the run resumes from it)."""

    state: State
    metrics: dict[str, float]
    stopped: bool


class TrainLoop:
    """One run in its workdir; a context manager that releases the workdir's resources.

    ``config`` needs ``batch_size``, ``log_every_steps``, ``checkpoint_every_steps`` and
    ``keep_checkpoints``; it is saved with every checkpoint. ``flops_per_step`` (global) gives
    TFLOP/s and MFU; ``logged_keys`` are written on every log line (None where absent).
    ``batches`` is restored in place by the caller before ``run`` (nothing is prefetched until
    the first step); ``device_prefetch`` batches are placed on the devices ahead of the step
    that uses them; ``profile_steps`` (first, last) are traced into ``<workdir>/profile``.
    ``lease``: the workdir's lease when the caller holds it (released by the caller); else the
    loop takes it (``force_unlock``: from a live holder too) and releases it on ``close``.
    """

    def __init__(
        self,
        workdir: str,
        config: ml_collections.ConfigDict,
        placement: sharding.Placement,
        batches: SkipCountingIterator,
        total_steps: int,
        *,
        flops_per_step: float | None = None,
        logged_keys: Sequence[str] = (),
        device_prefetch: int = 2,
        profile_steps: tuple[int, int] | None = None,
        lease: workdir_lock.Held | None = None,
        force_unlock: bool = False,
    ):
        self.config = config
        self.placement = placement
        self.batches = batches
        self.total_steps = total_steps
        self.logged_keys = tuple(logged_keys)
        try:
            config_checks.validate(config, placement.num_devices)
            self.data = prefetch.DevicePrefetch(batches, placement, device_prefetch)
            self.profiler = profiling.StepProfiler(profile_steps, workdir)
            self._own_lease = lease is None
            self.lease = lease or workdir_lock.hold_for_run(workdir, force_unlock)
        except BaseException:
            batches.close()  # the loop owns the iterator, however it ends
            raise
        self.checkpointer = ckpt.Checkpointer(workdir, config.keep_checkpoints)
        self.writer = MetricWriter(workdir)
        self.throughput = progress.Throughput(
            config.batch_size,
            flops_per_step,
            placement.num_devices,
            hardware.peak_flops_per_device(),
        )
        self.last: dict[str, float] = {}

    def __enter__(self) -> TrainLoop:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Let an in-flight checkpoint finish (whatever ended the run), then release."""
        try:
            self.profiler.stop()
            self.checkpointer.wait()
            self.checkpointer.close()
            self.writer.close()
            self.data.close()
        finally:
            if self._own_lease:
                self.lease.release()

    def resume(self, abstract_state: State) -> tuple[State, str] | None:
        """The workdir's newest usable checkpoint (state, and the data position restored in
        place) and where it came from; None when the workdir holds none. Either way
        ``metrics.jsonl`` keeps only the records up to the step the run starts from."""
        diffs: list[config_diff.ConfigDiff] = []

        def check_config(saved: dict[str, Any] | None) -> None:
            diffs.clear()
            if saved is None:
                logging.warning("the checkpoint holds no config: the resumed run is not compared")
            else:
                diffs.append(config_diff.diff_on_resume(saved, self.config))

        restored = self.checkpointer.restore_latest(abstract_state, self.batches, check_config)
        dropped = self.writer.resume_at(restored.step if restored else None)
        if dropped:
            logging.info("metrics.jsonl: %d record(s) past the restored step set aside", dropped)
        if restored is None:
            return None
        if diffs and diffs[0]:
            logging.warning("resuming with a changed config: %s", diffs[0].describe())
            record = diffs[0].record()
            self.writer.write(restored.step, record)
            self.checkpointer.note({"step": restored.step, **record})
        return restored.state, f"resumed from {self.checkpointer.directory}/{restored.step}"

    def train_step(self, step_fn: StepFn, state: State, step: int) -> tuple[State, dict, HostBatch]:
        """Step number ``step`` (1-based) on the next batch: ``(state, metrics on device, the
        host batch)``."""
        host_batch, device_batch = next(self.data)
        self.profiler.before(step)
        state, metrics = step_fn(state, device_batch)
        self.profiler.after(step, (state, metrics))
        return state, metrics, host_batch

    def run(
        self,
        state: State,
        step_fn: StepFn,
        evaluate: Evaluate | None = None,
        log_metrics: LogMetrics | None = None,
    ) -> Outcome:
        """Steps from ``state``'s step to ``total_steps``, or until a stop request.
        ``log_metrics(state)`` adds metrics of the state a logged step returned (computed at
        log steps only, not by every step)."""
        step = int(jax.device_get(state["step"]))
        self.throughput.reset(step)
        pending: tuple[int, dict] | None = None  # the previous step's loss terms, on device
        stopped = False
        with preemption.StopSignal() as stop:
            while step < self.total_steps and not stopped:
                state, metrics, host_batch = self.train_step(step_fn, state, step + 1)
                step += 1
                if pending is not None:
                    check_finite(pending[0], host_metrics(pending[1]))
                pending = (step, {k: v for k, v in metrics.items() if k.startswith("loss")})
                if progress.is_log_step(step, self.config.log_every_steps, self.total_steps):
                    if log_metrics is not None:
                        metrics = {**metrics, **log_metrics(state)}
                    self._log(step, metrics, host_batch)
                stopped = stop.should_stop(step)  # once per step on every process
                if stopped or self._checkpoint_due(step):
                    check_finite(pending[0], host_metrics(pending[1]))  # never save a bad state
                    self._save(step, state, force=stopped or step == self.total_steps)
                if evaluate is not None and not stopped:
                    self._evaluate(evaluate, step, state)
        return Outcome(state, dict(self.last), stopped)

    def _checkpoint_due(self, step: int) -> bool:
        return step == self.total_steps or step % self.config.checkpoint_every_steps == 0

    def _save(self, step: int, state: State, force: bool) -> None:
        self.lease.check()  # never write over a workdir another run has taken
        self.writer.flush()
        self.checkpointer.save(step, state, self.data, self.config, force=force)

    def _log(self, step: int, metrics: dict[str, jax.Array], host_batch: HostBatch) -> None:
        host = host_metrics(metrics)
        host["data/batch_fingerprint"] = batch_fingerprint(host_batch)
        check_finite(step, host)
        record = {**host, **self.throughput.measure(step), **self.data.stats.metrics()}
        record["skipped_records"] = record.pop("data/skipped_records")
        for key in self.logged_keys:
            record.setdefault(key, None)
        self.writer.write(step, record)
        self.last = record
        progress.log_line(step, self.total_steps, record)

    def _evaluate(self, evaluate: Evaluate, step: int, state: State) -> None:
        started = time.perf_counter()
        evaluate(step, state, step == self.total_steps)
        self.throughput.exclude(time.perf_counter() - started)
