r"""Transfer a pretrained SyCoCa checkpoint: linear probe, fine-tuned classifier or VQA.

  python -m sycoca_jax.transfer --config=configs/transfer.py:task=linear_probe \
      --init=/tmp/sycoca_tiny --workdir=/tmp/sycoca_tiny_probe
  python -m sycoca_jax.transfer --config=configs/transfer.py:task=finetune --init=... --workdir=...
  python -m sycoca_jax.transfer --config=configs/transfer.py:task=vqa --init=... --workdir=...

``--init`` is a pretraining workdir, its ``checkpoints`` folder or one step's folder (default:
the latest step). Results go to ``<workdir>/transfer_results.json``; see configs/transfer.py.
"""

from __future__ import annotations

from absl import flags

from sycoca_jax import binaries
from sycoca_jax.transfer import run as transfer_run


def main(f: flags.FlagValues) -> None:
    config = f.config
    if f.init:
        config.init = f.init
    transfer_run.run(config, f.workdir, force_unlock=f.force_unlock)


def define_flags() -> None:
    binaries.define_flags(
        "Transfer config file.", "Where results, metrics and the head's checkpoint go."
    )
    binaries.define_force_unlock()
    flags.DEFINE_string("init", None, "Pretraining checkpoint (workdir, or a step folder).")


def run() -> None:
    """Console-script entry point (``sycoca-transfer``)."""
    binaries.run(main, define_flags)


if __name__ == "__main__":
    run()
