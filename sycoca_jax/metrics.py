"""Metric output: ``workdir/metrics.jsonl`` (one JSON object per line) and TensorBoard events
(via tensorboardX, no TensorFlow). Only process 0 writes; other processes get a silent writer.

One record per step and kind, across kills and resumes. The policy is truncation: a run that
resumes from step S calls ``resume_at(S)``, which removes every record past S (the resumed run
writes them again) and ``resume_at(None)`` when it starts from scratch. Removed records and torn
lines are never lost: they go to ``metrics.dropped/<time>.jsonl``.

Local disks: each record is one ``write`` to a file opened for appending (a line lands whole or,
if the process dies inside the write, is a torn last line that the next writer moves aside).

Object stores (gs://, s3://): objects cannot be appended to, and rewriting a growing file per log
step costs O(steps²). Records are buffered and written every ``flush_every_s`` (and on ``flush``
/ ``close``) as a new object ``metrics.parts/<time>-<pid>-<id>.jsonl``; ``read_metrics`` reads
``metrics.jsonl`` then the parts in name order; ``resume_at`` folds everything back into one
``metrics.jsonl`` (via ``metrics.jsonl.new``, which supersedes the rest until it is renamed).
A kill loses at most the unflushed buffer, so call ``flush`` when saving a checkpoint.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import time
import uuid
from collections.abc import Mapping
from typing import Any

import numpy as np
from absl import logging
from etils import epath

METRICS_NAME = "metrics.jsonl"
PARTS_DIR = "metrics.parts"
DROPPED_DIR = "metrics.dropped"
FLUSH_EVERY_S = 60.0


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


def _unique_name() -> str:
    """Sorts by creation time; unique across processes and writers."""
    return f"{time.time_ns():020d}-{os.getpid()}-{uuid.uuid4().hex[:8]}.jsonl"


def _step_of(line: str) -> int | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    step = record.get("step") if isinstance(record, dict) else None
    return step if isinstance(step, int) else None


def _parts(workdir: epath.Path) -> list[epath.Path]:
    folder = workdir / PARTS_DIR
    return sorted(folder.glob("*.jsonl"), key=lambda p: p.name) if folder.exists() else []


def _record_lines(workdir: epath.Path) -> tuple[list[str], list[epath.Path]]:
    """Every line written so far, in order, and the part objects they came from.

    A ``metrics.jsonl.new`` left by a resume that died before renaming it holds everything.
    """
    staged = workdir / f"{METRICS_NAME}.new"
    if staged.exists():
        return staged.read_text().splitlines(), _parts(workdir)
    base = workdir / METRICS_NAME
    lines = base.read_text().splitlines() if base.exists() else []
    parts = _parts(workdir)
    for part in parts:
        lines.extend(part.read_text().splitlines())
    return lines, parts


class MetricWriter:
    """Writes metric records to ``metrics.jsonl`` and TensorBoard (see the module docstring)."""

    def __init__(
        self,
        workdir: str,
        enabled: bool | None = None,
        tensorboard: bool = True,
        appendable: bool | None = None,
        flush_every_s: float = FLUSH_EVERY_S,
    ):
        if enabled is None:
            import jax

            enabled = jax.process_index() == 0
        self.enabled = enabled
        self._workdir = epath.Path(workdir)
        self._path = self._workdir / METRICS_NAME
        self._tb = None
        self._appendable = not is_object_store(workdir) if appendable is None else appendable
        self._buffer: list[str] = []
        self._flush_every_s = flush_every_s
        self._flushed_at = time.monotonic()
        if self.enabled:
            self._workdir.mkdir(parents=True, exist_ok=True)
            if self._appendable:
                self._repair_torn_tail()
            if tensorboard:
                self._tb = _summary_writer(os.fspath(self._workdir / "tensorboard"))

    # ------------------------------------------------------------------------------- write
    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
        line = json.dumps(record) + "\n"
        if self._appendable:
            self._append(line.encode())
        else:
            self._buffer.append(line)
            if time.monotonic() - self._flushed_at >= self._flush_every_s:
                self.flush()
        if self._tb is not None:
            for key, value in record.items():
                if (
                    key != "step"
                    and isinstance(value, (int, float))
                    and not isinstance(value, bool)
                ):
                    self._tb.add_scalar(key, value, int(step))
            self._tb.flush()

    def write_image(self, step: int, tag: str, image: np.ndarray) -> None:
        """An (H, W, 3) uint8 image under ``tag`` in TensorBoard (not in ``metrics.jsonl``)."""
        if self._tb is not None:
            self._tb.add_image(tag, np.asarray(image), int(step), dataformats="HWC")
            self._tb.flush()

    def _append(self, data: bytes) -> None:
        """One ``write`` of the whole line on an O_APPEND descriptor."""
        fd = os.open(os.fspath(self._path), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)

    def flush(self) -> None:
        """Object stores: write the buffered records as one new part object."""
        self._flushed_at = time.monotonic()
        if not self.enabled or not self._buffer:
            return
        folder = self._workdir / PARTS_DIR
        folder.mkdir(parents=True, exist_ok=True)
        (folder / _unique_name()).write_text("".join(self._buffer))
        self._buffer.clear()

    # ------------------------------------------------------------------------------ resume
    def resume_at(self, step: int | None) -> int:
        """Remove the records past ``step`` (the step a run resumes from; None: the run starts
        from scratch, so every record goes). Returns how many were removed."""
        if not self.enabled:
            return 0
        self.flush()
        lines, parts = _record_lines(self._workdir)
        kept, dropped = [], []
        for line in lines:
            if not line.strip():
                continue
            found = _step_of(line)
            keep = step is not None and found is not None and found <= step
            (kept if keep else dropped).append(line)
        staged = self._workdir / f"{METRICS_NAME}.new"
        if not dropped and not parts and not staged.exists():
            return 0
        if dropped:
            self._keep_aside(dropped, f"resumed at step {step}")
        text = "".join(line + "\n" for line in kept)
        if self._appendable:
            temp = f"{os.fspath(self._path)}.{uuid.uuid4().hex}.tmp"
            with open(temp, "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temp, os.fspath(self._path))
        else:  # objects: the staged copy supersedes the rest until it is renamed
            staged.write_text(text)
        for part in parts:
            part.unlink()
        if not self._appendable:
            staged.rename(self._path)
        elif staged.exists():
            staged.unlink()
        return len(dropped)

    def _repair_torn_tail(self) -> None:
        """A record cut short by a kill has no newline; it would glue onto the next record."""
        if not self._path.exists():
            return
        data = self._path.read_bytes()
        if not data or data.endswith(b"\n"):
            return
        end = data.rfind(b"\n") + 1
        self._keep_aside([data[end:].decode(errors="replace")], "torn last line")
        os.truncate(os.fspath(self._path), end)

    def _keep_aside(self, lines: list[str], why: str) -> None:
        folder = self._workdir / DROPPED_DIR
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / _unique_name()
        path.write_text("".join(line + "\n" for line in lines))
        logging.warning("metrics.jsonl: moved %d record(s) to %s (%s)", len(lines), path, why)

    def close(self) -> None:
        self.flush()
        if self._tb is not None:
            self._tb.close()


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    """Every record written to ``workdir`` (``metrics.jsonl`` and any parts not yet folded into
    it), in order; lines that are not JSON objects (a torn line) are skipped with a warning."""
    lines, _ = _record_lines(epath.Path(workdir))
    records, bad = [], 0
    for line in lines:
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict):
            records.append(record)
        else:
            bad += 1
    if bad:
        logging.warning("%s: skipped %d unreadable line(s)", workdir, bad)
    return records
