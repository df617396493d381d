r"""Print a checkpoint's step, parameter counts per part and a digest of the parameter values.

  python -m sycoca_jax.tools.inspect_checkpoint WORKDIR_OR_CHECKPOINT_DIR [--step N] [--json]

Equal parameters give equal digests, so two runs (or a run and its resumed twin) can be compared
without loading them side by side.
"""

from __future__ import annotations

import json
from typing import Any

from absl import app, flags

from sycoca_jax import checkpoint as ckpt
from sycoca_jax.models import sycoca


def inspect(path: str, step: int | None = None) -> dict[str, Any]:
    directory = ckpt.checkpoint_dir(path)
    checkpointer = ckpt.Checkpointer(directory.parent, async_save=False)
    step = checkpointer.latest_step() if step is None else step
    checkpointer.close()
    if step is None:
        raise FileNotFoundError(f"no checkpoint under {directory}")
    params = ckpt.load_params(path, step=step)
    return {
        "step": int(step),
        "params": sycoca.param_counts(params),
        "digest": ckpt.params_digest(params),
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
    app.run(main)
