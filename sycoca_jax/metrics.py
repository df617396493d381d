"""Metric output: ``workdir/metrics.jsonl`` (one object per logged step) and TensorBoard events
(via tensorboardX, no TensorFlow). Only process 0 writes; other processes get a silent writer."""

from __future__ import annotations

import importlib.util
import json
import math
import os
from collections.abc import Mapping
from typing import Any

import jax
from absl import logging
from etils import epath


def _plain(value: Any) -> Any:
    """JSON-friendly scalar: floats stay floats, NaN/Inf become None."""
    if value is None:
        return None
    value = value.item() if hasattr(value, "item") else value
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def is_object_store(path: Any) -> bool:
    """``gs://``, ``s3://`` and the like: objects are written whole; there is no appending."""
    return "://" in os.fspath(path)


def _summary_writer(logdir: str) -> Any:
    """tensorboardX's writer, or None (with a warning) where it cannot reach ``logdir``:
    tensorboardX writes gs:// through google-cloud-storage and s3:// through boto3."""
    needs = {"gs": "google.cloud.storage", "s3": "boto3"}.get(logdir.split("://")[0])
    if needs is not None:
        try:
            found = importlib.util.find_spec(needs) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            logging.warning(
                "TensorBoard events need %s for %s; writing metrics.jsonl only "
                "(pip install -e '.[gcs]')",
                needs,
                logdir,
            )
            return None
    from tensorboardX import SummaryWriter

    return SummaryWriter(logdir)


class MetricWriter:
    """Appends metrics to ``metrics.jsonl`` and TensorBoard; safe to resume (appends).

    On object stores (GCS, S3) a file cannot be appended to (gcsfs silently overwrites it), so
    there the writer keeps the file's lines and rewrites the object whole on every write.
    """

    def __init__(
        self,
        workdir: str,
        enabled: bool | None = None,
        tensorboard: bool = True,
        appendable: bool | None = None,
    ):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._path = epath.Path(workdir) / "metrics.jsonl"
        self._tb = None
        self._lines: list[str] | None = None  # the whole file, where it is rewritten each time
        if appendable is None:
            appendable = not is_object_store(workdir)
        if self.enabled:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            if not appendable:
                existing = self._path.read_text() if self._path.exists() else ""
                self._lines = [line for line in existing.splitlines() if line.strip()]
            if tensorboard:
                self._tb = _summary_writer(os.fspath(epath.Path(workdir) / "tensorboard"))

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
        line = json.dumps(record)
        if self._lines is None:
            with self._path.open("a") as f:
                f.write(line + "\n")
        else:
            self._lines.append(line)
            self._path.write_text("\n".join(self._lines) + "\n")
        if self._tb is not None:
            for key, value in record.items():
                if (
                    key != "step"
                    and isinstance(value, (int, float))
                    and not isinstance(value, bool)
                ):
                    self._tb.add_scalar(key, value, int(step))
            self._tb.flush()

    def write_images(self, step: int, name: str, images: Any) -> None:
        """(B, H, W, 3) uint8 pictures to TensorBoard (nothing to ``metrics.jsonl``)."""
        if self.enabled and self._tb is not None:
            self._tb.add_images(name, images, int(step), dataformats="NHWC")
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
