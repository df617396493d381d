r"""Train SyCoCa (or CoCa / CLIP) from a config.

  python -m sycoca_jax.main --config=configs/sycoca.py:tiny --workdir=/tmp/sycoca_tiny
  python -m sycoca_jax.main --config=configs/sycoca.py:size=B/16 --config.batch_size=4096 ...

Runs resume from ``--workdir`` automatically; SIGTERM saves a checkpoint and exits.

Several hosts (one process each, or one per GPU) run this same command; on Cloud TPU VMs, in
multi-task SLURM steps, under OpenMPI and in Kubernetes indexed Jobs they find each other by
themselves. Elsewhere (e.g. several processes on one machine) give the coordinator::

  python -m sycoca_jax.main ... --coordinator_address=localhost:12345 --num_processes=2 \
      --process_id=0   # and =1 in the second process

(``launch/local_multiprocess.sh`` does exactly that; ``launch/`` has TPU and SLURM launchers).
"""

from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

from sycoca_jax import binaries, train


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = binaries.config_from_flags()  # before any work: a bad value fails in one line
    binaries.start()
    train.train_and_evaluate(config, flags.FLAGS.workdir)


def define_flags() -> None:
    """Flags are defined here, not at import, so importing this module has no side effects."""
    config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
    flags.DEFINE_string("workdir", None, "Where checkpoints and metrics go (local or gs://).")
    flags.mark_flags_as_required(["config", "workdir"])
    binaries.define_flags()


def run() -> None:
    """Console-script entry point (``sycoca-train``)."""
    define_flags()
    binaries.run_app(main)


if __name__ == "__main__":
    run()
