"""Metric output: ``workdir/metrics.jsonl`` (one object per logged step) and TensorBoard events
(via tensorboardX, no TensorFlow). Only process 0 writes; other processes get a silent writer."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any

import jax
from etils import epath


def _plain(value: Any) -> Any:
    """JSON-friendly scalar: floats stay floats, NaN/Inf become None."""
    if value is None:
        return None
    value = value.item() if hasattr(value, "item") else value
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricWriter:
    """Appends metrics to ``metrics.jsonl`` and TensorBoard; safe to resume (appends)."""

    def __init__(self, workdir: str, enabled: bool | None = None, tensorboard: bool = True):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._path = epath.Path(workdir) / "metrics.jsonl"
        self._tb = None
        if self.enabled:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(os.fspath(epath.Path(workdir) / "tensorboard"))

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
        with self._path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in record.items():
                if (
                    key != "step"
                    and isinstance(value, (int, float))
                    and not isinstance(value, bool)
                ):
                    self._tb.add_scalar(key, value, int(step))
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    """All records of ``metrics.jsonl`` (for tests, notebooks and the benchmark)."""
    path = epath.Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
