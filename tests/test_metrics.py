"""metrics.jsonl holds one record per step and kind across kills and resumes: torn lines are
repaired, records past the resumed step are replaced (kept aside, not lost), and on object stores
records go out in appended parts, never by rewriting the file per log step."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

from sycoca_jax import metrics
from sycoca_jax.metrics import MetricWriter, read_metrics


def _writer(workdir, **kwargs) -> MetricWriter:
    return MetricWriter(str(workdir), enabled=True, tensorboard=False, **kwargs)


def _dropped(workdir) -> list[str]:
    folder = pathlib.Path(workdir) / metrics.DROPPED_DIR
    if not folder.exists():
        return []
    return [line for p in sorted(folder.iterdir()) for line in p.read_text().splitlines()]


def test_a_torn_last_line_is_moved_aside_not_glued_to_the_next_record(tmp_path):
    first = _writer(tmp_path)
    first.write(1, {"loss": 3.0})
    first.write(2, {"loss": 2.5})
    with open(tmp_path / "metrics.jsonl", "a") as f:  # killed inside the write of step 3
        f.write('{"step": 3, "lo')
    resumed = _writer(tmp_path)
    resumed.write(3, {"loss": 2.0})
    assert [(r["step"], r["loss"]) for r in read_metrics(str(tmp_path))] == [
        (1, 3.0),
        (2, 2.5),
        (3, 2.0),
    ]
    assert _dropped(tmp_path) == ['{"step": 3, "lo']


def test_read_metrics_skips_a_bad_line_in_the_middle(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(
        '{"step": 1}\n{"step": 2, "lo{"step": 3}\n{"step": 4}\n'
    )
    assert [r["step"] for r in read_metrics(str(tmp_path))] == [1, 4]


def test_resume_replaces_the_records_past_the_restored_step(tmp_path):
    run = _writer(tmp_path)
    run.write(0, {"compile/seconds": 1.0})
    for step in range(1, 8):
        run.write(step, {"loss": float(step)})
        if step == 4:
            run.write(step, {"val/loss": 9.0})
    assert run.resume_at(4) == 3  # steps 5, 6, 7 go; the validation record at 4 stays
    resumed = _writer(tmp_path)
    for step in range(5, 9):
        resumed.write(step, {"loss": 10.0 + step})
    records = read_metrics(str(tmp_path))
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4, 4, 5, 6, 7, 8]
    assert [r["loss"] for r in records if r["step"] > 4] == [15.0, 16.0, 17.0, 18.0]
    assert [json.loads(line)["step"] for line in _dropped(tmp_path)] == [5, 6, 7]


def test_starting_from_scratch_sets_every_old_record_aside(tmp_path):
    """A run killed before its first checkpoint starts again at step 0: its compile record and
    steps would otherwise appear twice."""
    run = _writer(tmp_path)
    run.write(0, {"compile/seconds": 1.0})
    run.write(1, {"loss": 1.0})
    _writer(tmp_path).resume_at(None)
    assert read_metrics(str(tmp_path)) == []
    assert len(_dropped(tmp_path)) == 2


_CHILD = r"""
import sys, time
from sycoca_jax.metrics import MetricWriter
workdir, every = sys.argv[1], 10
checkpoint = workdir + "/checkpoint"
try:
    resumed = int(open(checkpoint).read())
except FileNotFoundError:
    resumed = None
writer = MetricWriter(workdir, enabled=True, tensorboard=False)
writer.resume_at(resumed)
step = resumed or 0
if resumed is None:
    writer.write(0, {"compile/seconds": 1.0})
while step < 200:
    step += 1
    writer.write(step, {"loss": 1000.0 - step, "pad": "x" * 3000})
    if step % every == 0:
        writer.write(step, {"val/loss": float(step)})
        with open(checkpoint + ".tmp", "w") as f:
            f.write(str(step))
        import os
        os.replace(checkpoint + ".tmp", checkpoint)
    time.sleep(0.002)
"""


def test_five_kill9_resume_cycles_leave_one_record_per_step(tmp_path):
    """A writer process (logging every step, 'checkpointing' every 10) is SIGKILLed five times
    at arbitrary points and resumed from its last checkpoint each time."""
    env = {**os.environ, "PYTHONPATH": str(pathlib.Path(__file__).resolve().parents[1])}
    command = [sys.executable, "-c", _CHILD, str(tmp_path)]
    for kill in range(5):
        child = subprocess.Popen(command, env=env, stderr=subprocess.PIPE)
        deadline = time.time() + 60
        start = len(read_metrics(str(tmp_path)))
        while len(read_metrics(str(tmp_path))) < start + 15 + 7 * kill:
            assert child.poll() is None, child.stderr.read().decode()[-2000:]
            assert time.time() < deadline
            time.sleep(0.01)
        child.send_signal(signal.SIGKILL)
        child.wait()
    finished = subprocess.run(command, env=env, capture_output=True, timeout=120)
    assert finished.returncode == 0, finished.stderr.decode()[-2000:]
    records = read_metrics(str(tmp_path))
    train = [r["step"] for r in records if "loss" in r]
    assert train == list(range(1, 201))
    assert all(r["loss"] == 1000.0 - r["step"] for r in records if "loss" in r)
    assert [r["step"] for r in records if "val/loss" in r] == list(range(10, 201, 10))
    assert [r["step"] for r in records if "compile/seconds" in r] == [0]


# ------------------------------------------------------------------------------ object stores
def test_object_store_writes_parts_and_never_rewrites_the_file(tmp_path):
    writer = _writer(tmp_path, appendable=False, flush_every_s=3600)
    for step in range(1, 31):
        writer.write(step, {"loss": float(step)})
        if step % 10 == 0:
            writer.flush()  # at each checkpoint
    assert not (tmp_path / "metrics.jsonl").exists()
    parts = sorted((tmp_path / metrics.PARTS_DIR).iterdir())
    assert [len(p.read_text().splitlines()) for p in parts] == [10, 10, 10]
    writer.write(31, {"loss": 31.0})  # buffered: lost if killed now, written by close
    writer.close()
    assert [r["step"] for r in read_metrics(str(tmp_path))] == list(range(1, 32))

    resumed = _writer(tmp_path, appendable=False)
    assert resumed.resume_at(20) == 11
    assert not (tmp_path / metrics.PARTS_DIR).exists() or not any(
        (tmp_path / metrics.PARTS_DIR).iterdir()
    )
    resumed.write(21, {"loss": -21.0})
    resumed.close()
    records = read_metrics(str(tmp_path))
    assert [r["step"] for r in records] == list(range(1, 22)) and records[-1]["loss"] == -21.0


def test_object_store_resume_that_died_midway_is_completed(tmp_path):
    """A resume writes metrics.jsonl.new before removing the parts: if it dies between the two,
    the staged file alone is the truth, and the next resume finishes the job."""
    writer = _writer(tmp_path, appendable=False, flush_every_s=0)
    for step in range(1, 6):
        writer.write(step, {"loss": float(step)})
    (tmp_path / "metrics.jsonl.new").write_text(
        "".join(json.dumps({"step": s, "loss": float(s)}) + "\n" for s in range(1, 4))
    )
    assert [r["step"] for r in read_metrics(str(tmp_path))] == [1, 2, 3]
    _writer(tmp_path, appendable=False).resume_at(3)
    assert not (tmp_path / "metrics.jsonl.new").exists()
    assert [r["step"] for r in read_metrics(str(tmp_path))] == [1, 2, 3]
