"""What is fixed for a pretraining run, and its first state.

Initialisation order (big_vision's): resume from the workdir's latest checkpoint → an explicit
``config.resume`` checkpoint → transfer init from ``config.init.checkpoint`` (a parameter
subtree) → from scratch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging
from flax import linen as nn
from jax.sharding import Mesh

from sycoca_jax import checkpoint as ckpt
from sycoca_jax import durations, losses, optim, sharding
from sycoca_jax.models import build, pixels, sycoca

State = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class TrainSetup:
    """Everything the step needs that is fixed for a run."""

    config: ml_collections.ConfigDict
    model: sycoca.SyCoCa
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    placement: sharding.Placement
    abstract_state: State  # ShapeDtypeStructs carrying their shardings
    state_shardings: State
    total_steps: int
    warmup_steps: int


def batch_spec(config: ml_collections.ConfigDict, batch_size: int | None = None) -> dict[str, Any]:
    """Shapes of one global training batch."""
    m = config.model
    b = batch_size or config.batch_size
    return {
        "image": jax.ShapeDtypeStruct((b, m.image_size, m.image_size, 3), pixels.IMAGE_DTYPE),
        "tokens": jax.ShapeDtypeStruct((b, m.max_text_len + 1), jnp.int32),
    }


def _init_fn(model: sycoca.SyCoCa, tx: optax.GradientTransformation, config) -> Callable:
    """rng -> boxed state (params carry logical axis names; so does the optimiser state)."""
    spec = batch_spec(config, batch_size=1)

    def init(rng):
        params_rng, masking_rng = jax.random.split(rng)
        images = jnp.zeros(spec["image"].shape, spec["image"].dtype)
        tokens = jnp.zeros(spec["tokens"].shape, spec["tokens"].dtype)
        params = model.init({"params": params_rng, "masking": masking_rng}, images, tokens)[
            "params"
        ]
        return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}

    return init


def _warn_if_contrastive_head_drifts(config: ml_collections.ConfigDict) -> None:
    if not config.loss.itc_weight:
        logging.warning(
            "loss.itc_weight is 0: the contrastive head drifts. Its projections get no gradient "
            "but weight decay still shrinks them, the layers beneath "
            "(towers, the cascade's caption pooler) keep changing, and so do the attentive-"
            "masking scores built on it; zero-shot classification and retrieval degrade "
            "(open_clip's caption-only fine-tune fell from 63%% to 0.8%% ImageNet zero-shot). "
            "Keep a small itc_weight (e.g. 0.1) or report both heads."
        )


def make_setup(
    config: ml_collections.ConfigDict,
    placement: sharding.Placement | Mesh,
    num_train_examples: int | None,
) -> TrainSetup:
    """The run's model, optimiser and sharded state layout; a bare mesh takes the config's
    logical rules (``config.mesh.rules``)."""
    if isinstance(placement, Mesh):
        placement = sharding.Placement(placement, sharding.logical_rules(config.mesh.rules))
    losses.check_loss_config(config.loss, config.model)
    _warn_if_contrastive_head_drifts(config)
    sharding.check_batch_size(config.batch_size, placement.mesh, config.microbatches)
    model = build.from_config(config.model)
    total, warmup = durations.run_length(config, num_train_examples)
    tx, schedule = optim.make_optimizer(config.optim, total, warmup)
    boxed = jax.eval_shape(_init_fn(model, tx, config), jax.random.key(0))
    abstract, shardings = placement.abstract(boxed)
    return TrainSetup(config, model, tx, schedule, placement, abstract, shardings, total, warmup)


def initial_state(setup: TrainSetup, seed: int) -> State:
    """A fresh state, created already sharded (no full copy on any one device)."""
    init = _init_fn(setup.model, setup.tx, setup.config)
    with setup.placement.context():
        create = jax.jit(lambda rng: nn.unbox(init(rng)), out_shardings=setup.state_shardings)
        return create(jax.random.key(seed))


def resume_latest(
    checkpointer: ckpt.Checkpointer, abstract_state: State, data_iterator: Any
) -> tuple[State, str] | None:
    """The workdir's newest usable checkpoint (state, and the data iterator's position restored
    in place; a damaged newer step is logged and set aside) and where it came from; None when
    the workdir holds none. ``TrainLoop.resume`` also compares the configs and the metrics."""
    restored = checkpointer.restore_latest(abstract_state, data_iterator)
    if restored is None:
        return None
    return restored.state, f"resumed from {checkpointer.directory}/{restored.step}"


def restore_or_init(
    setup: TrainSetup, checkpointer: ckpt.Checkpointer, data_iterator: Any
) -> tuple[State, str]:
    """The documented initialisation order; returns the state and where it came from."""
    resumed = resume_latest(checkpointer, setup.abstract_state, data_iterator)
    return resumed or init_without_workdir(setup, data_iterator)


def init_without_workdir(setup: TrainSetup, data_iterator: Any) -> tuple[State, str]:
    """The initialisation order's steps after the workdir's own checkpoints."""
    config = setup.config
    if config.resume:
        other = ckpt.Checkpointer(ckpt.checkpoint_dir(config.resume).parent, async_save=False)
        step = other.latest_step()
        if step is None:
            raise FileNotFoundError(f"config.resume={config.resume!r} holds no checkpoint")
        state = other.restore(step, setup.abstract_state, data_iterator)
        other.close()
        return state, f"resumed from {config.resume} step {step}"
    state = initial_state(setup, config.seed)
    if config.init.checkpoint:
        state = transfer_init(setup, state, config.init.checkpoint, tuple(config.init.subtrees))
        return state, f"initialised {list(config.init.subtrees)} from {config.init.checkpoint}"
    return state, "initialised from scratch"


def transfer_init(setup: TrainSetup, state: State, path: str, subtrees: tuple[str, ...]) -> State:
    """Overwrite parameter subtrees (e.g. ``image_encoder``) with a checkpoint's values."""
    params = dict(state["params"])
    for name in subtrees:
        target = setup.state_shardings["params"][name]
        loaded = ckpt.load_params(path, name)
        mismatch = ckpt.describe_mismatch(params[name], loaded)
        if mismatch:
            raise ckpt.IncompatibleCheckpointError(
                f"{path}: subtree {name!r} does not fit this model:\n{mismatch}"
            )
        params[name] = jax.device_put(loaded, target)
    return {**state, "params": params}
