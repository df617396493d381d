r"""Train SyCoCa (or CoCa / CLIP) from a config.

  python -m sycoca_jax.main --config=configs/sycoca.py:tiny --workdir=/tmp/sycoca_tiny
  python -m sycoca_jax.main --config=configs/sycoca.py:size=B/16 --config.batch_size=4096 ...

Runs resume from ``--workdir`` automatically; SIGTERM saves a checkpoint and exits. One run
holds a workdir at a time (``--force_unlock`` takes it from a run you know is dead); a resumed
run must have the checkpoint's config (``--config.allow_config_change=field,...`` accepts a
change; docs/reliability.md).

Several hosts (one process each, or one per GPU) run this same command; on Cloud TPU VMs, in
multi-task SLURM steps, under OpenMPI and in Kubernetes indexed Jobs they find each other by
themselves. Elsewhere (e.g. several processes on one machine) give the coordinator::

  python -m sycoca_jax.main ... --coordinator_address=localhost:12345 --num_processes=2 \
      --process_id=0   # and =1 in the second process

(``launch/local_multiprocess.sh`` does exactly that; ``launch/`` has TPU and SLURM launchers).
"""

from __future__ import annotations

from absl import flags

from sycoca_jax import binaries
from sycoca_jax.train import pretrain


def main(f: flags.FlagValues) -> None:
    pretrain.train_and_evaluate(f.config, f.workdir, force_unlock=f.force_unlock)


def define_flags() -> None:
    binaries.define_flags("Config file.", "Where checkpoints and metrics go (local or gs://).")
    binaries.define_force_unlock()


def run() -> None:
    """Console-script entry point (``sycoca-train``)."""
    binaries.run(main, define_flags)


if __name__ == "__main__":
    run()
