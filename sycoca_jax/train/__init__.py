"""Training, one module per concern:

- ``setup``: what is fixed for a pretraining run (``TrainSetup``: model, optimiser, placement,
  sharded state layout) and its first state (``restore_or_init``, ``transfer_init``);
- ``step``: the jitted step (loss, microbatching, update), its ahead-of-time compilation with a
  memory/FLOPs report, and the validation step;
- ``loop``: ``TrainLoop``, the loop that pretraining and transfer share (checkpoints, SIGTERM,
  NaN checks, logging, resume);
- ``pretrain``: ``train_and_evaluate``, the pretraining run behind ``sycoca_jax.main``;
- ``preemption``: what the processes agree on (the stop step after SIGTERM, barriers);
- ``progress``: throughput, MFU, ETA and the log line.

The names below are re-exported so ``from sycoca_jax import train; train.train_and_evaluate``
keeps working.
"""

from sycoca_jax.train.loop import (
    NonFiniteLossError,
    TrainLoop,
    batch_fingerprint,
    check_finite,
)
from sycoca_jax.train.preemption import StopSignal, wait_for_every_process
from sycoca_jax.train.pretrain import train_and_evaluate, validation_metrics
from sycoca_jax.train.progress import Throughput
from sycoca_jax.train.setup import (
    TrainSetup,
    batch_spec,
    initial_state,
    make_setup,
    restore_or_init,
    transfer_init,
)
from sycoca_jax.train.step import compile_train_step, make_eval_step, make_train_step

__all__ = [
    "NonFiniteLossError",
    "StopSignal",
    "Throughput",
    "TrainLoop",
    "TrainSetup",
    "batch_fingerprint",
    "batch_spec",
    "check_finite",
    "compile_train_step",
    "initial_state",
    "make_eval_step",
    "make_setup",
    "make_train_step",
    "restore_or_init",
    "train_and_evaluate",
    "transfer_init",
    "validation_metrics",
    "wait_for_every_process",
]
