r"""Print a checkpoint's step, parameter counts per part and a digest of the parameter values.

  python -m sycoca_jax.tools.inspect_checkpoint PATH [--step N] [--json]

``PATH`` is a workdir, its ``checkpoints`` folder or one step folder (``checkpoints/<step>``).
Nothing is written: the checkpoint is opened read-only. Equal parameters give equal digests, so
two runs (or a run and its resumed twin) can be compared without loading them side by side.
"""

from __future__ import annotations

import json
import os
from typing import Any

from absl import app, flags

from sycoca_jax import binaries, checkpoint_integrity
from sycoca_jax import checkpoint as ckpt
from sycoca_jax.models import build


def inspect(path: str, step: int | None = None) -> dict[str, Any]:
    directory, named = ckpt.locate(path)
    if named is not None:
        if step is not None and step != named:
            raise ckpt.CheckpointNotFoundError(f"{path} is step {named}, but --step={step}")
        step = named
    steps = sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())
    step = steps[-1] if step is None else step
    if step not in steps:
        raise ckpt.CheckpointNotFoundError(f"{directory} has no step {step} (steps: {steps})")
    params = ckpt.load_params(os.fspath(directory), step=step)
    return {
        "step": int(step),
        "params": build.param_counts(params),
        "digest": checkpoint_integrity.params_digest(params),
    }


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        raise app.UsageError("usage: inspect_checkpoint DIR [--step N] [--json]")
    info = inspect(argv[1], flags.FLAGS.step)
    if flags.FLAGS.json:
        print(json.dumps(info))
        return
    print(f"step {info['step']}")
    for part, count in info["params"].items():
        print(f"  {part:<22}{count:>16,}")
    print(f"digest {info['digest']}")


def define_flags() -> None:
    """Flags are defined here, not at import, so importing this module has no side effects."""
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
    flags.DEFINE_bool("json", False, "Print one JSON object.")


if __name__ == "__main__":
    define_flags()
    binaries.run_app(main)
