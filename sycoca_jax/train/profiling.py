"""``config.profile_steps``: a ``jax.profiler`` trace of chosen training steps.

``--config.profile_steps=a,b`` traces steps a..b (1-based, inclusive; ``a`` alone traces one
step) into ``<workdir>/profile/plugins/profile/<time>/``: a ``*.xplane.pb`` that TensorBoard's
profile plugin or XProf opens (``tensorboard --logdir <workdir>/profile``), and a
``*.trace.json.gz`` that Perfetto (ui.perfetto.dev) opens directly and
``python -m sycoca_jax.tools.trace_summary`` condenses (device busy time, kernel time by kind,
the top kernels). Choose steps after the first few: the first step also holds compilation-cache
loads and input warm-up.
"""

from __future__ import annotations

import os
from typing import Any

import jax
from absl import logging


def parse_steps(text: str | None) -> tuple[int, int] | None:
    """``"a,b"`` -> (a, b), ``"a"`` -> (a, a), ``""``/None -> None; anything else one line."""
    if text is None or not str(text).strip():
        return None
    parts = [p.strip() for p in str(text).split(",")]
    try:
        steps = [int(p) for p in parts]
    except ValueError:
        steps = []
    if len(steps) == 1:
        steps = steps * 2
    if len(steps) != 2 or steps[0] < 1 or steps[1] < steps[0]:
        raise ValueError(
            f"config.profile_steps={text!r}: expected FIRST,LAST step numbers with "
            "1 <= FIRST <= LAST (e.g. --config.profile_steps=10,12), or one step"
        )
    return steps[0], steps[1]


class StepProfiler:
    """Starts a trace before the first chosen step and stops it once the last one finished."""

    def __init__(self, steps: tuple[int, int] | None, workdir: str):
        self.steps = steps
        self.logdir = os.path.join(workdir, "profile")
        self.active = False

    def before(self, step: int) -> None:
        """Called before running ``step`` (1-based)."""
        if self.steps is not None and step == self.steps[0] and not self.active:
            jax.profiler.start_trace(self.logdir, create_perfetto_trace=True)
            self.active = True
            logging.info("profiling steps %d..%d into %s", *self.steps, self.logdir)

    def after(self, step: int, outputs: Any) -> None:
        """Called after dispatching ``step``; waits for it only when the trace ends there."""
        if self.active and step >= self.steps[1]:
            jax.block_until_ready(outputs)
            self.stop()

    def stop(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active = False
            logging.info("profile written to %s", self.logdir)
