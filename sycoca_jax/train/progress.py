"""Progress of a run: throughput (examples/s, TFLOP/s per device, MFU), ETA and the log line."""

from __future__ import annotations

import dataclasses
import time

from absl import logging


@dataclasses.dataclass
class Throughput:
    """Examples/s, TFLOP/s/device and MFU over the last logging window (FLOP-based numbers are
    None where the FLOPs per step, or the device's peak, are unknown)."""

    batch_size: int
    flops_per_step: float | None
    num_devices: int
    peak: float | None
    _time: float = dataclasses.field(default_factory=time.perf_counter)
    _step: int = 0

    def reset(self, step: int) -> None:
        self._time, self._step = time.perf_counter(), step

    def exclude(self, seconds: float) -> None:
        """Leave out time spent on other work (validation, evaluators) from the window."""
        self._time += seconds

    def measure(self, step: int) -> dict[str, float | None]:
        now = time.perf_counter()
        steps, seconds = step - self._step, max(now - self._time, 1e-9)
        self._time, self._step = now, step
        examples_per_sec = steps * self.batch_size / seconds
        tflops = None
        if self.flops_per_step is not None:
            tflops = steps * self.flops_per_step / seconds / self.num_devices / 1e12
        return {
            "examples_per_sec": examples_per_sec,
            "examples_per_sec_per_device": examples_per_sec / self.num_devices,
            "tflops_per_sec_per_device": tflops,
            "mfu": None if self.peak is None or tflops is None else tflops * 1e12 / self.peak,
            "seconds_per_step": seconds / max(steps, 1),
        }


def format_eta(seconds: float) -> str:
    seconds = int(seconds)
    return (
        f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
        if seconds >= 3600
        else f"{seconds // 60}m{seconds % 60:02d}s"
    )


def is_log_step(step: int, log_every_steps: int, total_steps: int) -> bool:
    return step == 1 or step % log_every_steps == 0 or step == total_steps


def log_line(step: int, total_steps: int, record: dict[str, float]) -> None:
    """``step 40/60 (67%) loss 1.2345 | 812.3 ex/s | ETA 0m03s``."""
    remaining = (total_steps - step) * record["seconds_per_step"]
    logging.info(
        "step %d/%d (%.0f%%) loss %.4f | %.1f ex/s | ETA %s",
        step,
        total_steps,
        100 * step / total_steps,
        record["loss"],
        record["examples_per_sec"],
        format_eta(remaining),
    )
