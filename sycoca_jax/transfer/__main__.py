r"""Transfer a pretrained SyCoCa checkpoint: linear probe, fine-tuned classifier or VQA.

  python -m sycoca_jax.transfer --config=configs/transfer.py:task=linear_probe \
      --init=/tmp/sycoca_tiny --workdir=/tmp/sycoca_tiny_probe
  python -m sycoca_jax.transfer --config=configs/transfer.py:task=finetune --init=... --workdir=...
  python -m sycoca_jax.transfer --config=configs/transfer.py:task=vqa --init=... --workdir=...

``--init`` is a pretraining workdir, its ``checkpoints`` folder or one step's folder (default:
the latest step). Results go to ``<workdir>/transfer_results.json``; see configs/transfer.py.
"""

from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

from sycoca_jax import binaries
from sycoca_jax.transfer import run as transfer_run


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = binaries.config_from_flags()
    binaries.start()
    if flags.FLAGS.init:
        config.init = flags.FLAGS.init
    transfer_run.run(config, flags.FLAGS.workdir)


def define_flags() -> None:
    """Flags are defined here, not at import, so importing this module has no side effects."""
    config_flags.DEFINE_config_file("config", None, "Transfer config file.", lock_config=True)
    flags.DEFINE_string("init", None, "Pretraining checkpoint (workdir, or a step folder).")
    flags.DEFINE_string("workdir", None, "Where results, metrics and the head's checkpoint go.")
    flags.mark_flags_as_required(["config", "workdir"])
    binaries.define_flags()


def run() -> None:
    define_flags()
    binaries.run_app(main)


if __name__ == "__main__":
    run()
