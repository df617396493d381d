"""What the processes of a run agree on: when to stop (SIGTERM, preemption), when all have
arrived (barriers), and shared yes/no decisions. Public JAX and Orbax APIs only."""

from __future__ import annotations

import signal

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils


def preemption_service_enabled() -> bool:
    """Whether ``jax.distributed.initialize`` starts JAX's preemption sync manager: it does
    unless the ``jax_enable_preemption_service`` option is off (read here from the public
    config; ``StopSignal.should_stop`` still falls back if the manager turns out missing)."""
    return bool(getattr(jax.config, "jax_enable_preemption_service", True))


class StopSignal:
    """Turns SIGTERM (preemption, scancel, kill) into a checkpoint-and-exit at a step on which
    every process agrees.

    One process: a Python SIGTERM handler sets a flag that ``should_stop`` reads (no collective).
    Several processes: a SIGTERM may reach only some of them, and a process that stopped alone
    would leave the others waiting in the next collective. ``jax.distributed.initialize`` starts
    JAX's preemption sync manager, which catches SIGTERM itself, tells every process through the
    coordination service and picks the first step all of them can still reach;
    ``should_stop(step)`` asks it (``multihost_utils.reached_preemption_sync_point``, a local
    check, no device work) and turns True on that same step everywhere. It must therefore be
    called once per step, on every process, from the same starting step. No Python handler is
    installed then (it would take SIGTERM away from JAX's). Should the preemption service be
    disabled (``jax_enable_preemption_service=False``), the flag is all-gathered every step
    instead, which costs a host-device sync per step.
    """

    def __init__(self):
        self.requested = False
        self._previous = None
        self._installed = False
        self._mode = "local"

    def __enter__(self) -> StopSignal:
        if jax.process_count() > 1:
            if preemption_service_enabled():
                self._mode = "preemption_sync"
                return self
            self._use_allgather()
        self._install()
        return self

    def _install(self) -> None:
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
            self._installed = True
        except ValueError:  # not the main thread: nothing to install
            self._previous = None

    def _handle(self, signum, frame):
        logging.warning("SIGTERM received: saving a checkpoint, then exiting")
        self.requested = True

    def _use_allgather(self) -> None:
        self._mode = "allgather"
        logging.warning(
            "JAX's preemption service is not running: SIGTERM is agreed on with a per-step "
            "all-gather, which slows every step a little"
        )

    def should_stop(self, step: int) -> bool:
        """Whether to save and leave after ``step`` (the same answer on every process)."""
        if self._mode == "preemption_sync":
            return self._reached_sync_point(step)
        if self._mode == "allgather":
            flags = multihost_utils.process_allgather(np.asarray(self.requested, np.int32))
            return bool(np.any(flags))
        return self.requested

    def _reached_sync_point(self, step: int) -> bool:
        try:
            reached = multihost_utils.reached_preemption_sync_point(step)
        except RuntimeError:  # no sync manager after all (every process sees the same)
            self._use_allgather()
            self._install()
            return False
        if reached:
            logging.warning("preemption notice: saving at step %d, then exiting", step)
            self.requested = True
        return reached

    def __exit__(self, *exc):
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous)


def wait_for_every_process(name: str, timeout_s: int = 3600) -> None:
    """A barrier through JAX's coordination service (no device work; a no-op for one process).
    ``name`` must be unique within the run."""
    sync = ocp.multihost.get_barrier_sync_fn()
    sync(key=name, timeout_ms=timeout_s * 1000)


def all_processes_agree(flag: bool) -> bool:
    """Whether ``flag`` holds on every process (one small all-gather when there are several):
    decisions that change which collectives run must be taken the same way everywhere."""
    if jax.process_count() == 1:
        return flag
    flags = multihost_utils.process_allgather(np.asarray(flag, np.int32))
    return bool(np.all(flags))
