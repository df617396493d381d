"""Training a task head on a pretrained tower, with the pretraining loop (``train.loop``).

State is ``{"step", "params": {"tower", "head"}, "opt_state"}``, created already sharded (logical
axis names -> ``Placement.abstract``), with the tower restored from the pretraining checkpoint
and the head freshly initialised. The optimiser is ``optim.make_optimizer`` twice under
``optax.multi_transform``: one for the head (``optim.lr``) and one for the tower
(``optim.tower_lr``); with ``optim.freeze_tower`` the tower is not differentiated at all (CoCa's
frozen-feature setting) and holds no optimiser state. Each group clips its own gradient norm.
One jitted step with donation, run by ``train.loop.TrainLoop``: checkpoints every
``checkpoint_every_steps``, at the end and on SIGTERM; a NaN or Inf loss stops the run; metrics
every ``log_every_steps`` to ``metrics.jsonl``; a run resumes from its workdir.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import linen as nn
from jax.experimental import multihost_utils

from sycoca_jax import durations, optim, sharding, workdir_lock
from sycoca_jax.data import pipeline
from sycoca_jax.data.skipping import SkipCountingIterator
from sycoca_jax.models import sycoca
from sycoca_jax.train import loop
from sycoca_jax.transfer import towers

State = dict[str, Any]
Batch = dict[str, jax.Array]
LossFn = Callable[[Any, Batch], tuple[jax.Array, dict[str, jax.Array]]]


@dataclasses.dataclass(frozen=True)
class HeadTask:
    """What a task adds to the trainer: which tower subtrees it uses, its head (initialised from
    ``head_inputs``, arrays or shape structs) and its loss ``loss_fn(params, batch)``."""

    model: sycoca.SyCoCa
    tower_names: tuple[str, ...]
    head: nn.Module
    head_inputs: tuple[Any, ...]
    loss_fn: LossFn

    def init(self, rng: jax.Array) -> dict[str, Any]:
        """Boxed parameters: a random tower (shapes only matter; the checkpoint replaces it)
        and a fresh head."""
        tower_rng, head_rng = jax.random.split(rng)
        model = self.model
        images = jnp.zeros((1, model.image_size, model.image_size, 3), jnp.float32)
        tokens = jnp.zeros((1, model.max_text_len + 1), jnp.int32)
        tower = model.init({"params": tower_rng, "masking": tower_rng}, images, tokens)["params"]
        return {"tower": {n: tower[n] for n in self.tower_names}, "head": self.init_head(head_rng)}

    def init_head(self, rng: jax.Array) -> Any:
        inputs = [jnp.zeros(x.shape, x.dtype) for x in self.head_inputs]
        return self.head.init(rng, *inputs)["params"]


@dataclasses.dataclass(frozen=True)
class HeadSetup:
    """Everything fixed for one transfer run."""

    config: ml_collections.ConfigDict
    task: HeadTask
    placement: sharding.Placement
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    trainable: tuple[str, ...]  # ("head",) or ("tower", "head")
    abstract_state: State  # ShapeDtypeStructs carrying their shardings
    state_shardings: State
    total_steps: int
    warmup_steps: int


def make_optimizer(
    optim_config: ml_collections.ConfigDict, total_steps: int, warmup_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule, tuple[str, ...]]:
    """``(tx over the trainable groups, the head's schedule, the trainable groups)``."""
    head_tx, schedule = optim.make_optimizer(optim_config, total_steps, warmup_steps)
    if optim_config.freeze_tower:
        return optax.multi_transform({"head": head_tx}, {"head": "head"}), schedule, ("head",)
    tower_config = optim_config.copy_and_resolve_references()
    tower_config.lr = optim_config.tower_lr
    tower_tx, _ = optim.make_optimizer(tower_config, total_steps, warmup_steps)
    groups = {"tower": tower_tx, "head": head_tx}
    return optax.multi_transform(groups, {k: k for k in groups}), schedule, ("tower", "head")


def make_setup(
    config: ml_collections.ConfigDict, task: HeadTask, num_train_examples: int | None
) -> HeadSetup:
    placement = sharding.Placement.from_config(config.mesh)
    sharding.check_batch_size(config.batch_size, placement.mesh)
    sharding.check_batch_size(config.eval_batch_size, placement.mesh)
    total, warmup = durations.run_length(config, num_train_examples)
    tx, schedule, trainable = make_optimizer(config.optim, total, warmup)

    def init_state(rng):
        params = task.init(rng)
        opt_state = tx.init({k: params[k] for k in trainable})
        return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": opt_state}

    abstract, shardings = placement.abstract(jax.eval_shape(init_state, jax.random.key(0)))
    return HeadSetup(
        config, task, placement, tx, schedule, trainable, abstract, shardings, total, warmup
    )


def initial_state(setup: HeadSetup, pretrained: towers.Pretrained, seed: int) -> State:
    """The tower from the checkpoint, a fresh head and optimiser state, all sharded."""
    shardings = setup.state_shardings
    tower = pretrained.tower_params(setup.task.tower_names, shardings["params"]["tower"])
    with setup.placement.context():
        head = jax.jit(
            lambda rng: nn.unbox(setup.task.init_head(rng)),
            out_shardings=shardings["params"]["head"],
        )(jax.random.key(seed))
        params = {"tower": tower, "head": head}
        opt_state = jax.jit(
            lambda p: setup.tx.init({k: p[k] for k in setup.trainable}),
            out_shardings=shardings["opt_state"],
        )(params)
    step = jax.device_put(jnp.zeros((), jnp.int32), shardings["step"])
    return {"step": step, "params": params, "opt_state": opt_state}


def make_train_step(setup: HeadSetup) -> loop.StepFn:
    """The jitted ``(state, batch) -> (state, metrics)``, traced under the placement; only the
    trainable groups are differentiated."""
    tx, trainable, loss_fn = setup.tx, setup.trainable, setup.task.loss_fn

    def step(state: State, batch: Batch):
        params = state["params"]
        variables = {k: params[k] for k in trainable}

        def loss(trained):
            return loss_fn({**params, **trained}, batch)

        (_, metrics), grads = jax.value_and_grad(loss, has_aux=True)(variables)
        updates, opt_state = tx.update(grads, state["opt_state"], variables)
        new = optax.apply_updates(variables, updates)
        metrics = dict(metrics)
        metrics["grad_norm"] = optax.tree.norm(grads)
        metrics["param_norm"] = optax.tree.norm(new)
        metrics["lr"] = setup.schedule(state["step"])
        new_state = {"step": state["step"] + 1, "params": {**params, **new}, "opt_state": opt_state}
        return new_state, metrics

    jitted = jax.jit(
        step,
        in_shardings=(setup.state_shardings, setup.placement.batch_sharding),
        out_shardings=(setup.state_shardings, setup.placement.replicated),
        donate_argnums=(0,),
    )

    def placed(state: State, batch: Batch):
        with setup.placement.context():
            return jitted(state, batch)

    return placed


def train_head(
    setup: HeadSetup,
    workdir: str,
    batches: SkipCountingIterator,
    pretrained: towers.Pretrained,
    lease: workdir_lock.Held | None = None,
) -> loop.Outcome:
    """Trains in ``workdir`` with the pretraining loop (``train.loop.TrainLoop``: periodic
    checkpoints, SIGTERM, NaN checks, progress), resuming from the workdir's latest checkpoint
    if it holds one, else starting from ``pretrained``'s tower and a fresh head. Closes
    ``batches``. ``lease``: the workdir's, when the caller holds it (else the loop takes it)."""
    config = setup.config
    with loop.TrainLoop(
        workdir, config, setup.placement, batches, setup.total_steps, lease=lease
    ) as run:
        resumed = run.resume(setup.abstract_state)
        state, origin = resumed or (
            initial_state(setup, pretrained, config.seed),
            f"tower from {pretrained.path} step {pretrained.step}, a new head",
        )
        start = int(jax.device_get(state["step"]))
        logging.info("%s at step %d of %d", origin, start, setup.total_steps)
        return run.run(state, make_train_step(setup))


def gather(x: jax.Array) -> np.ndarray:
    """The whole global array on every host, as numpy."""
    if jax.process_count() == 1:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def predict(
    placement: sharding.Placement,
    fn: Callable[[Any, Batch], dict[str, jax.Array]],
    params: Any,
    dataset: Iterable[dict[str, np.ndarray]],
    inputs: Sequence[str],
    keep: Sequence[str] = (),
    num_threads: int = 2,
) -> dict[str, np.ndarray]:
    """``fn(params, batch)`` over an evaluation dataset: its outputs and the batch entries
    ``keep``, concatenated over batches, padding rows (``mask`` False) dropped, in dataset order
    (by the batches' ``index``, where they have one) whatever the process layout.

    ``fn`` should be the same object across calls, so its compilation is reused. Batches are
    prepared by ``num_threads`` background threads (0: inline).
    """
    if num_threads > 0 and isinstance(dataset, grain.MapDataset):
        options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=2 * num_threads)
        dataset = dataset.to_iter_dataset(options)
    jitted = jax.jit(fn)
    parts: dict[str, list[np.ndarray]] = {}
    start = time.perf_counter()
    with placement.context():
        for host in dataset:
            carried = [*keep, "mask", *(["index"] if "index" in host else [])]
            names = list(dict.fromkeys([*inputs, *carried]))
            batch = pipeline.make_global_batch({k: host[k] for k in names}, placement)
            outputs = dict(jitted(params, {k: batch[k] for k in inputs}))
            outputs.update({k: batch[k] for k in carried})
            for key, value in outputs.items():
                parts.setdefault(key, []).append(gather(value))
    if not parts:
        raise ValueError("the evaluation dataset is empty")
    out = _in_dataset_order({k: np.concatenate(v) for k, v in parts.items()})
    count = len(next(iter(out.values())))
    logging.info("predicted %d examples in %.1f s", count, time.perf_counter() - start)
    return out


def _in_dataset_order(out: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Rows without padding (``mask``), sorted by ``index`` where there is one."""
    mask = out.pop("mask").astype(bool)
    order = np.argsort(out.pop("index")[mask], kind="stable") if "index" in out else slice(None)
    return {k: v[mask][order] for k, v in out.items()}
