r"""Fault drill: a short tiny pretraining run hit by random kill -9, SIGTERM and checkpoint
damage must end exactly where an undisturbed run ends.

  python -m sycoca_jax.tools.fault_drill --workdir=/tmp/drill [--rounds=8 --seed=0]

Under ``--workdir`` it builds a small copy of the embedded dataset (``data/``), trains an
undisturbed reference run (``reference/``), then runs the same command in ``drill/`` ``rounds``
times, each round one fault drawn with ``--seed``: kill -9 or SIGTERM a few steps after the last
resumed step, or damage the newest checkpoint between runs (each kind of damage in
``tools.damage`` in turn; only while an older step exists to fall back to). A last run finishes
the drill run undisturbed. It then checks that the final parameters' digest equals the
reference's, that every damaged step was set aside (``checkpoints/damaged/``) with the run
falling back to an older one, and that ``metrics.jsonl`` holds exactly one training record per
step, and prints kills survived, damage variants recovered and records lost. Exit code 0 when
every check holds, 1 otherwise. Runs on CPU (``JAX_PLATFORMS=cpu``); compiled programs are
cached in ``<workdir>/jax_cache`` unless ``JAX_COMPILATION_CACHE_DIR`` is set.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import app, flags, logging

from sycoca_jax import binaries, checkpoint_integrity
from sycoca_jax import checkpoint as ckpt
from sycoca_jax.errors import UserError
from sycoca_jax.metrics import read_metrics
from sycoca_jax.tools import damage

CONFIG = pathlib.Path(__file__).resolve().parents[2] / "configs" / "sycoca.py"
ACTIONS = ("kill9", "sigterm", "damage")
RUN_TIMEOUT_S = 600


class DrillFailed(UserError):
    """A run of the drill failed (its stderr's tail says why)."""


def data_config() -> Any:
    """The drill's dataset: the embedded shapes at 64 px, 96 training images."""
    from sycoca_jax.data import shapes_builder

    return shapes_builder.shapes_config(image_size=64, num_train=96, num_validation=20, num_test=40)


def prepare_data(data_dir: str) -> str:
    """Build the drill's dataset under ``data_dir`` (once); returns its TFDS name."""
    from sycoca_jax.data import shapes_builder

    config = data_config()
    shapes_builder.prepare(config, data_dir)
    return f"sycoca_shapes/{config.name}"


def overrides(
    data_name: str, data_dir: str, total_steps: int, checkpoint_every_steps: int
) -> dict[str, Any]:
    """The tiny config, one layer per tower, batch 16, logging every step, no evaluations."""
    from sycoca_jax.config_args import load_config

    values: dict[str, Any] = {
        "data.name": data_name,
        "data.data_dir": data_dir,
        "data.num_workers": 0,
        "batch_size": 16,
        "total_steps": total_steps,
        "log_every_steps": 1,
        "eval_every_steps": 0,
        "checkpoint_every_steps": checkpoint_every_steps,
        "keep_checkpoints": 3,
        "optim.warmup_steps": 2,
        "model.image_depth": 1,
        "model.text_depth": 1,
        "model.multimodal_depth": 1,
    }
    for name in load_config(f"{CONFIG}:tiny").evals.keys():
        values[f"evals.{name}.every_steps"] = 0
    return values


def command(workdir: str, values: dict[str, Any]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "sycoca_jax.main",
        f"--config={CONFIG}:tiny",
        f"--workdir={workdir}",
        *(f"--config.{key}={value}" for key, value in values.items()),
    ]


def environment(cache_dir: str) -> dict[str, str]:
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cpu"
    env.setdefault("JAX_COMPILATION_CACHE_DIR", cache_dir)
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
    return env


def training_steps(workdir: str) -> list[int]:
    """The steps of the training records in ``metrics.jsonl``, in file order."""
    if not (pathlib.Path(workdir) / "metrics.jsonl").exists():
        return []
    return [r["step"] for r in read_metrics(workdir) if "loss" in r]


def run_to_end(workdir: str, values: dict[str, Any], env: dict[str, str]) -> None:
    result = subprocess.run(
        command(workdir, values), env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S
    )
    if result.returncode != 0:
        raise DrillFailed(f"{workdir}: exit {result.returncode}: {result.stderr[-2000:]}")


def interrupt(
    workdir: str, values: dict[str, Any], env: dict[str, str], sig: int, after_step: int
) -> int:
    """Start the run, send ``sig`` once it has logged ``after_step``; returns the last step it
    logged before the signal (the run may end by itself first). Records a killed run left past
    its checkpoint do not count: the new run first truncates them (below ``after_step``).

    Its stderr goes to a file, not a pipe: nothing reads while we wait for steps, and a run that
    logs more than a pipe holds (a damaged checkpoint's restore errors) would block on it."""
    with tempfile.TemporaryFile("w+") as errors:
        logged, sent, returncode = _signal_after(
            command(workdir, values), env, errors, workdir, sig, after_step
        )
        errors.seek(0)
        stderr = errors.read()
    if (sig == signal.SIGTERM or not sent) and returncode != 0:
        raise DrillFailed(f"{workdir}: exit {returncode}: {stderr[-2000:]}")
    return logged


def _signal_after(
    argv: list[str], env: dict[str, str], errors: Any, workdir: str, sig: int, after_step: int
) -> tuple[int, bool, int]:
    """Run ``argv`` with stderr to ``errors``; (last step logged, signal sent, exit code)."""
    process = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=errors)
    deadline = time.monotonic() + RUN_TIMEOUT_S
    logged, sent, fresh = 0, False, False
    while process.poll() is None and time.monotonic() < deadline:
        try:
            logged = max(training_steps(workdir), default=0)
        except (OSError, ValueError):  # a record being written
            continue
        fresh = fresh or logged < after_step
        if fresh and logged >= after_step:
            process.send_signal(sig)
            sent = True
            break
        time.sleep(0.02)
    if process.poll() is None and not sent:
        process.kill()
        sent = True
    return logged, sent, process.wait(timeout=RUN_TIMEOUT_S)


def committed_steps(workdir: str) -> list[int]:
    folder = pathlib.Path(workdir) / ckpt.CHECKPOINT_DIR
    if not folder.exists():
        return []
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())


def set_aside_steps(workdir: str) -> list[int]:
    folder = pathlib.Path(workdir) / ckpt.CHECKPOINT_DIR / checkpoint_integrity.DAMAGED_DIR
    if not folder.exists():
        return []
    return [int(p.name.split("-")[0]) for p in folder.iterdir()]


@dataclasses.dataclass
class Report:
    reference_digest: str
    final_digest: str
    kills: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    damaged: list[tuple[str, int]] = dataclasses.field(default_factory=list)
    recovered: list[str] = dataclasses.field(default_factory=list)
    records_lost: int = 0
    records_duplicated: int = 0

    @property
    def ok(self) -> bool:
        return (
            self.final_digest == self.reference_digest
            and len(self.recovered) == len(self.damaged)
            and self.records_lost == 0
            and self.records_duplicated == 0
        )

    def lines(self) -> list[str]:
        kills = sum(self.kills.values())
        names = ", ".join(self.recovered) or "none"
        return [
            f"kills survived: {kills} (kill -9: {self.kills['kill9']}, "
            f"SIGTERM: {self.kills['sigterm']})",
            f"damage variants recovered: {len(self.recovered)} of {len(self.damaged)} ({names})",
            f"records lost: {self.records_lost}, duplicated: {self.records_duplicated}",
            "final digest: "
            + (
                "equals the undisturbed run's"
                if self.final_digest == self.reference_digest
                else f"{self.final_digest} != undisturbed {self.reference_digest}"
            ),
            "drill: " + ("passed" if self.ok else "FAILED"),
        ]


def drill(
    workdir: str,
    rounds: int,
    seed: int = 0,
    total_steps: int | None = None,
    checkpoint_every_steps: int = 3,
    actions: Sequence[str] = ACTIONS,
    data_dir: str | None = None,
    cache_dir: str | None = None,
) -> Report:
    """Run the drill under ``workdir`` (see the module docstring); ``actions`` limits the
    faults drawn (e.g. ``("kill9",)``); ``data_dir`` holds the drill's dataset already
    (default: built under ``workdir``); ``cache_dir``: the compilation cache."""
    from sycoca_jax.tools import inspect_checkpoint

    root = pathlib.Path(workdir)
    root.mkdir(parents=True, exist_ok=True)
    total = total_steps or max(12, 3 * rounds + 6)
    data_dir = data_dir or str(root / "data")
    data_name = prepare_data(data_dir)
    values = overrides(data_name, data_dir, total, checkpoint_every_steps)
    env = environment(str(root / "jax_cache"))
    if cache_dir:
        env["JAX_COMPILATION_CACHE_DIR"] = cache_dir
    reference, target = str(root / "reference"), str(root / "drill")
    if not committed_steps(reference) or committed_steps(reference)[-1] != total:
        run_to_end(reference, values, env)
    rng = np.random.default_rng(seed)
    report = Report(inspect_checkpoint.inspect(reference)["digest"], "")
    variants = list(damage.DAMAGES)
    rng.shuffle(variants)
    pending = False  # a damaged step the next run has yet to meet
    for _ in range(rounds):
        steps = committed_steps(target)
        choices = [a for a in actions if a != "damage" or (len(steps) >= 2 and not pending)]
        action = str(rng.choice(choices or ["kill9"]))
        if action == "damage":
            name = variants[len(report.damaged) % len(variants)]
            damage.DAMAGES[name](root / "drill" / ckpt.CHECKPOINT_DIR / str(steps[-1]))
            report.damaged.append((name, steps[-1]))
            pending = True
            continue
        start = steps[-1] if steps else 0  # where the next run resumes
        after = min(start + int(rng.integers(1, checkpoint_every_steps + 2)), total - 1)
        if after <= start:  # the run is about to end: no room for another fault
            break
        sig = signal.SIGKILL if action == "kill9" else signal.SIGTERM
        logged = interrupt(target, values, env, sig, after)
        pending = False
        if logged >= after:
            report.kills[action] += 1
        _note_recoveries(report, target)
    run_to_end(target, values, env)
    _note_recoveries(report, target)
    report.final_digest = inspect_checkpoint.inspect(target)["digest"]
    counts = collections.Counter(training_steps(target))
    report.records_lost = sum(1 for s in range(1, total + 1) if counts[s] == 0)
    report.records_duplicated = sum(n - 1 for n in counts.values() if n > 1)
    report.records_duplicated += sum(n for s, n in counts.items() if not 1 <= s <= total)
    return report


def _note_recoveries(report: Report, workdir: str) -> None:
    """A damaged step is recovered once the run set it aside and went on from an older one."""
    aside = collections.Counter(set_aside_steps(workdir))
    seen: collections.Counter = collections.Counter()
    recovered = []
    for name, step in report.damaged:
        seen[step] += 1
        if seen[step] <= aside[step]:
            recovered.append(name)
    report.recovered = recovered


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    if f.rounds < 1:
        raise app.UsageError("--rounds must be at least 1")
    logging.set_verbosity(logging.WARNING)
    started = time.perf_counter()
    report = drill(f.workdir, f.rounds, f.seed, f.total_steps or None, f.checkpoint_every_steps)
    for line in report.lines():
        print(line)
    print(f"seconds: {time.perf_counter() - started:.0f}")
    sys.exit(0 if report.ok else 1)


def define_flags() -> None:
    flags.DEFINE_string("workdir", None, "Where the drill's data, reference and drill runs go.")
    flags.mark_flag_as_required("workdir")
    flags.DEFINE_integer("rounds", 8, "Faults to inject.")
    flags.DEFINE_integer("seed", 0, "Draws the faults and when they strike.")
    flags.DEFINE_integer("total_steps", 0, "Length of the run (0: max(12, 3 × rounds + 6)).")
    flags.DEFINE_integer("checkpoint_every_steps", 3, "Checkpoint cadence of the run.")


if __name__ == "__main__":
    define_flags()
    binaries.run_app(main)
