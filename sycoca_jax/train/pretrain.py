"""Pretraining in a workdir: ``train_and_evaluate`` (behind ``sycoca_jax.main``) and the
validation losses it logs. The step is compiled ahead of time before the loop, with its memory
use and FLOPs logged; the loop itself is ``loop.TrainLoop``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from sycoca_jax import config_checks, flops, sharding, workdir_lock
from sycoca_jax.data import pipeline
from sycoca_jax.evaluation import registry
from sycoca_jax.evaluation.common import EvalContext
from sycoca_jax.metrics import MetricWriter
from sycoca_jax.train import loop, pictures, preemption, profiling
from sycoca_jax.train.setup import TrainSetup, init_without_workdir, make_setup
from sycoca_jax.train.step import compile_train_step, make_eval_step, make_log_metrics

# Logged on every line, None for an objective without that term.
LOSS_KEYS = ("loss/itc", "loss/caption", "loss/tgmim")


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, force_unlock: bool = False
) -> dict[str, float]:
    """Train ``config`` in ``workdir`` (resuming if it holds checkpoints); returns the last
    logged metrics. The config is checked, then the workdir's lease taken (``force_unlock``:
    from a live holder too), before any data is read."""
    config_checks.validate(config)
    for name in config.evals.keys():
        registry.resolve(config, name)  # a bad eval entry fails now, not after hours of training
    with workdir_lock.hold_for_run(workdir, force_unlock) as lease:
        return _train(config, workdir, lease)


def _train(
    config: ml_collections.ConfigDict, workdir: str, lease: workdir_lock.Held
) -> dict[str, float]:
    placement = sharding.Placement.from_config(config.mesh)
    batches = pipeline.make_train_iterator(config)
    setup = make_setup(config, placement, pipeline.num_train_examples(config))
    flops_per_step = flops.train_flops_per_example(config.model) * config.batch_size
    with loop.TrainLoop(
        workdir,
        config,
        placement,
        batches,
        setup.total_steps,
        flops_per_step=flops_per_step,
        logged_keys=LOSS_KEYS,
        device_prefetch=config.data.device_prefetch,
        profile_steps=profiling.parse_steps(config.profile_steps),
        lease=lease,
    ) as run:
        resumed = run.resume(setup.abstract_state)
        state, origin = resumed or init_without_workdir(setup, batches)
        start_step = int(jax.device_get(state["step"]))
        logging.info("%s at step %d of %d", origin, start_step, setup.total_steps)
        if start_step >= setup.total_steps:
            logging.info("nothing to do: the run is complete")
            return {}
        compiled = _compile(setup, run.writer, start_step)
        evaluate = _evaluator(setup, workdir, run.writer)
        return run.run(state, compiled, evaluate, make_log_metrics(setup)).metrics


def _compile(setup: TrainSetup, writer: MetricWriter, start_step: int) -> Any:
    compiled, report = compile_train_step(setup)
    # Hosts finish compiling at different times (persistent-cache hits, load); the step's first
    # collectives then set up their communicators with short timeouts (gloo on CPU: 30 s).
    preemption.wait_for_every_process("sycoca_train_step_compiled")
    if start_step == 0:
        writer.write(0, {f"compile/{k}": v for k, v in report.items()})
    return compiled


def _evaluator(setup: TrainSetup, workdir: str, writer: MetricWriter) -> loop.Evaluate:
    """Validation losses every ``eval_every_steps`` and the ``config.evals`` that are due."""
    config = setup.config
    eval_step = make_eval_step(setup)
    draw = pictures.picture_writer(setup, writer)

    def evaluate(step: int, state: loop.State, last_step: bool) -> None:
        if config.eval_every_steps and step % config.eval_every_steps == 0:
            writer.write(step, validation_metrics(setup, eval_step, state["params"]))
        due = registry.due(config, step, last_step)
        if due:
            results = registry.run(eval_context(setup, state["params"]), due)
            writer.write(step, registry.flatten(results))
            registry.write_results(workdir, step, results)
            if draw is not None:
                draw(step, state["params"])

    return evaluate


def eval_context(setup: TrainSetup, params: Any) -> EvalContext:
    """The evaluators' view of the model being trained."""
    return EvalContext.for_model(setup.model, params, setup.config, setup.placement)


def validation_metrics(setup: TrainSetup, eval_step: Callable, params: Any) -> dict[str, float]:
    """Mean losses over the first ``config.eval_batches`` full batches of the eval split
    (the padded last batch is left out: its placeholder rows would enter the contrastive loss).

    Every process must skip the same batches, or those that skip one leave the others waiting
    in its collectives: processes hold unequal shares of the split (and bad records mask rows
    anywhere), so they agree on it (one small all-gather per batch, with several processes)."""
    config = setup.config
    dataset = pipeline.make_eval_dataset(config, "validation")
    totals: dict[str, float] = {}
    count = 0
    for host_batch in dataset:
        if count >= config.eval_batches:
            break
        if not preemption.all_processes_agree(bool(np.all(host_batch.pop("mask")))):
            continue
        batch = pipeline.make_global_batch(host_batch, setup.placement)
        for key, value in loop.host_metrics(eval_step(params, batch)).items():
            totals[key] = totals.get(key, 0.0) + value
        count += 1
    return {f"val/{k}": v / count for k, v in totals.items()} if count else {}
