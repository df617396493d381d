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

The names below are re-exported lazily (``from sycoca_jax import train;
train.train_and_evaluate``): importing ``sycoca_jax.train.setup`` or ``.step`` alone (as
``tools.benchmark`` does on a bare accelerator host) pulls in no input pipeline or evaluator.
"""

import importlib
from typing import Any

_EXPORTS = {
    "NonFiniteLossError": "loop",
    "TrainLoop": "loop",
    "batch_fingerprint": "loop",
    "check_finite": "loop",
    "StopSignal": "preemption",
    "wait_for_every_process": "preemption",
    "train_and_evaluate": "pretrain",
    "validation_metrics": "pretrain",
    "Throughput": "progress",
    "TrainSetup": "setup",
    "batch_spec": "setup",
    "initial_state": "setup",
    "make_setup": "setup",
    "restore_or_init": "setup",
    "transfer_init": "setup",
    "compile_train_step": "step",
    "make_eval_step": "step",
    "make_train_step": "step",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
