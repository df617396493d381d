"""Training: sharded state, the jitted step, and the loop behind ``sycoca_jax.main``.

Initialisation order (big_vision's): resume from the workdir's latest checkpoint → an explicit
``config.resume`` checkpoint → transfer init from ``config.init.checkpoint`` (a parameter
subtree) → from scratch. The step is compiled ahead of time before the loop, with its memory
use and FLOPs logged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import time
import zlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from flax import linen as nn
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sycoca_jax import checkpoint as ckpt
from sycoca_jax import durations, flops, hardware, losses, optim, sharding
from sycoca_jax.evaluation import registry
from sycoca_jax.evaluation.common import EvalContext
from sycoca_jax.metrics import MetricWriter
from sycoca_jax.models import sycoca

State = dict[str, Any]
Batch = dict[str, jax.Array]


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or Inf; the run stops without saving the bad state."""


# --------------------------------------------------------------------------------------- setup
@dataclasses.dataclass(frozen=True)
class TrainSetup:
    """Everything the step needs that is fixed for a run."""

    config: ml_collections.ConfigDict
    model: sycoca.SyCoCa
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    mesh: Mesh
    rules: sharding.Rules
    abstract_state: State  # ShapeDtypeStructs carrying their shardings
    state_shardings: State
    total_steps: int
    warmup_steps: int

    @property
    def batch_sharding(self) -> NamedSharding:
        return sharding.batch_sharding(self.mesh)

    def context(self) -> contextlib.ExitStack:
        return sharding.model_context(self.mesh, self.rules)


def batch_spec(config: ml_collections.ConfigDict, batch_size: int | None = None) -> dict[str, Any]:
    """Shapes of one global training batch."""
    m = config.model
    b = batch_size or config.batch_size
    return {
        "image": jax.ShapeDtypeStruct((b, m.image_size, m.image_size, 3), jnp.float32),
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


def make_setup(
    config: ml_collections.ConfigDict, mesh: Mesh, num_train_examples: int | None
) -> TrainSetup:
    losses.check_loss_config(config.loss, config.model)
    if not config.loss.itc_weight:
        logging.warning(
            "loss.itc_weight is 0: the contrastive head drifts. Its projections get no gradient "
            "but weight decay still shrinks them, the layers beneath "
            "(towers, the cascade's caption pooler) keep changing, and so do the attentive-"
            "masking scores built on it; zero-shot classification and retrieval degrade "
            "(open_clip's caption-only fine-tune fell from 63%% to 0.8%% ImageNet zero-shot). "
            "Keep a small itc_weight (e.g. 0.1) or report both heads."
        )
    sharding.check_batch_size(config.batch_size, mesh, config.microbatches)
    model = sycoca.from_config(config.model)
    total, warmup = durations.run_length(config, num_train_examples)
    tx, schedule = optim.make_optimizer(config.optim, total, warmup)
    rules = sharding.logical_rules(config.mesh.rules)
    boxed = jax.eval_shape(_init_fn(model, tx, config), jax.random.key(0))
    shardings = sharding.shardings_from_boxed(boxed, mesh, rules)
    abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), nn.unbox(boxed), shardings
    )
    return TrainSetup(config, model, tx, schedule, mesh, rules, abstract, shardings, total, warmup)


def initial_state(setup: TrainSetup, seed: int) -> State:
    """A fresh state, created already sharded (no full copy on any one device)."""
    init = _init_fn(setup.model, setup.tx, setup.config)
    with setup.context():
        create = jax.jit(lambda rng: nn.unbox(init(rng)), out_shardings=setup.state_shardings)
        return create(jax.random.key(seed))


# ---------------------------------------------------------------------------------------- step
def _split_microbatches(batch: Batch, count: int) -> Batch:
    """(B, ...) -> (count, B/count, ...), microbatch j holding rows j, j+count, ... so every
    device keeps an equal share of each microbatch."""

    def split(x):
        x = x.reshape((x.shape[0] // count, count) + x.shape[1:]).swapaxes(0, 1)
        spec = PartitionSpec(None, sharding.BATCH_AXES)
        return jax.lax.with_sharding_constraint(x, spec)

    return jax.tree.map(split, batch)


def make_train_step(setup: TrainSetup) -> Callable[[State, Batch], tuple[State, dict]]:
    """``(state, batch) -> (state, metrics)``; masking noise comes from ``fold_in(seed, step)``.

    With ``config.microbatches = k > 1`` gradients are averaged over k sequential microbatches
    (one optimiser update per step, activation memory of one microbatch). The contrastive loss
    is then computed within each microbatch: each example sees B/k - 1 negatives instead of B - 1.
    """
    model, tx, config = setup.model, setup.tx, setup.config
    count = config.microbatches

    def loss_fn(params, batch, rng):
        out = model.apply(
            {"params": params}, batch["image"], batch["tokens"], rngs={"masking": rng}
        )
        return losses.total_loss(out, config.loss)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state: State, batch: Batch):
        rng = jax.random.fold_in(jax.random.key(config.seed), state["step"])
        params = state["params"]
        if count == 1:
            (_, metrics), grads = grad_fn(params, batch, rng)
        else:
            micro = _split_microbatches(batch, count)

            def accumulate(carry, inputs):
                index, microbatch = inputs
                (_, m), g = grad_fn(params, microbatch, jax.random.fold_in(rng, index))
                return jax.tree.map(jnp.add, carry, (g, m)), None

            zeros = jax.tree.map(
                jnp.zeros_like,
                jax.eval_shape(lambda: grad_fn(params, jax.tree.map(lambda x: x[0], micro), rng)),
            )
            zero_grads, zero_metrics = zeros[1], zeros[0][1]
            (grads, metrics), _ = jax.lax.scan(
                accumulate, (zero_grads, zero_metrics), (jnp.arange(count), micro)
            )
            grads, metrics = jax.tree.map(lambda x: x / count, (grads, metrics))
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        metrics = dict(metrics)
        metrics["grad_norm"] = optax.tree.norm(grads)
        metrics["param_norm"] = optax.tree.norm(new_params)
        metrics["update_norm"] = optax.tree.norm(updates)
        metrics["lr"] = setup.schedule(state["step"])
        return {"step": state["step"] + 1, "params": new_params, "opt_state": opt_state}, metrics

    return step


def compile_train_step(setup: TrainSetup) -> Any:
    """Lower and compile the step ahead of time, logging memory and FLOPs per device."""
    batch = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=setup.batch_sharding),
        batch_spec(setup.config),
    )
    jitted = jax.jit(
        make_train_step(setup),
        in_shardings=(setup.state_shardings, setup.batch_sharding),
        out_shardings=(setup.state_shardings, sharding.replicated(setup.mesh)),
        donate_argnums=(0,),
    )
    start = time.perf_counter()
    with setup.context():
        compiled = jitted.lower(setup.abstract_state, batch).compile()
    seconds = time.perf_counter() - start
    report = {"compile_seconds": seconds}
    memory = compiled.memory_analysis()
    if memory is not None:
        report.update(
            argument_gib=memory.argument_size_in_bytes / 2**30,
            output_gib=memory.output_size_in_bytes / 2**30,
            temp_gib=memory.temp_size_in_bytes / 2**30,
        )
    # Per device. The analytic count is the one MFU uses; XLA's own estimate is logged beside it
    # only as a cross-check (it misses cuBLAS/cuDNN calls on GPU and counts a scan body once).
    flops_per_step = flops.train_flops_per_example(setup.config.model) * setup.config.batch_size
    report["analytic_tflop_per_device"] = flops_per_step / setup.mesh.size / 1e12
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    if cost and "flops" in cost:
        report["xla_tflop_per_device"] = float(cost["flops"]) / 1e12
    logging.info("compiled the train step: %s", {k: round(v, 4) for k, v in report.items()})
    return compiled, report


def make_eval_step(setup: TrainSetup) -> Callable[[Any, Batch], dict]:
    """Validation losses on a batch, with fixed masking noise."""
    model, config = setup.model, setup.config

    def evaluate(params, batch):
        out = model.apply(
            {"params": params}, batch["image"], batch["tokens"], rngs={"masking": jax.random.key(0)}
        )
        return losses.total_loss(out, config.loss)[1]

    jitted = jax.jit(evaluate, out_shardings=sharding.replicated(setup.mesh))

    def run(params, batch):
        with setup.context():
            return jitted(params, batch)

    return run


# ---------------------------------------------------------------------------------------- loop
class StopSignal:
    """Turns SIGTERM (preemption, scancel, kill) into a checkpoint-and-exit at a step on which
    every process agrees.

    One process: a Python SIGTERM handler sets a flag that ``should_stop`` reads (no collective).
    Several processes: a SIGTERM may reach only some of them, and a process that stopped alone
    would leave the others waiting in the next collective. ``jax.distributed.initialize`` starts
    JAX's preemption sync manager, which catches SIGTERM itself, tells every process through the
    coordination service and picks the first step all of them can still reach;
    ``should_stop(step)`` asks it (a local check, no device work) and turns True on that same
    step everywhere. It must therefore be called once per step, on every process, from the same
    starting step. No Python handler is installed then (it would take SIGTERM away from JAX's).
    Should the preemption service be disabled (``jax_enable_preemption_service=False``), the
    flag is all-gathered every step instead, which costs a host-device sync per step.
    """

    def __init__(self):
        self.requested = False
        self._previous = None
        self._installed = False
        self._mode = "local"

    def __enter__(self):
        if jax.process_count() > 1:
            if _preemption_service_running():
                self._mode = "preemption_sync"
                return self
            self._use_allgather()
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
            self._installed = True
        except ValueError:  # not the main thread: nothing to install
            self._previous = None
        return self

    def _handle(self, signum, frame):
        logging.warning("SIGTERM received: saving a checkpoint, then exiting")
        self.requested = True

    def _use_allgather(self) -> None:
        self._mode = "allgather"
        logging.warning(
            "JAX's preemption service is not running: SIGTERM is agreed on with a per-step "
            "all-gather, which slows every step a little"
        )

    def should_stop(self, step: int) -> bool:
        """Whether to save and leave after ``step`` (the same answer on every process)."""
        if self._mode == "preemption_sync":
            try:
                reached = multihost_utils.reached_preemption_sync_point(step)
            except RuntimeError:  # no sync manager after all (every process sees the same)
                self._use_allgather()
                self._previous = signal.signal(signal.SIGTERM, self._handle)
                self._installed = True
                return False
            if reached:
                logging.warning("preemption notice: saving at step %d, then exiting", step)
                self.requested = True
            return reached
        if self._mode == "allgather":
            flags = multihost_utils.process_allgather(np.asarray(self.requested, np.int32))
            return bool(np.any(flags))
        return self.requested

    def __exit__(self, *exc):
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous)


def wait_for_every_process(name: str, timeout_s: int = 3600) -> None:
    """A barrier through JAX's coordination service (no device work; a no-op for one process).
    ``name`` must be unique within the run."""
    sync = ocp.multihost.get_barrier_sync_fn()
    sync(key=name, timeout_ms=timeout_s * 1000)


def _preemption_service_running() -> bool:
    """Whether ``jax.distributed.initialize`` started JAX's preemption sync manager (it does
    unless ``jax_enable_preemption_service`` is off). Read from JAX's internals where they are
    where we expect them; otherwise assume it runs (``should_stop`` falls back if not)."""
    try:
        from jax._src import distributed as jax_distributed
    except ImportError:
        return True
    state = getattr(jax_distributed, "global_state", None)
    if state is None or not hasattr(state, "preemption_sync_manager"):
        return True
    return state.preemption_sync_manager is not None


def check_finite(step: int, metrics: dict[str, float]) -> None:
    bad = [k for k, v in metrics.items() if k.startswith("loss") and not math.isfinite(v)]
    if bad:
        term = next((k for k in bad if k != "loss"), "loss")
        raise NonFiniteLossError(
            f"{term} is {metrics[term]} at step {step}; stopping. The last checkpoint (if any) "
            "is untouched. Lower optim.lr, raise optim.warmup_*, or check the data."
        )


def _format_eta(seconds: float) -> str:
    seconds = int(seconds)
    return (
        f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
        if seconds >= 3600
        else f"{seconds // 60}m{seconds % 60:02d}s"
    )


@dataclasses.dataclass
class Throughput:
    """Examples/s, TFLOP/s/device and MFU over the last logging window."""

    batch_size: int
    flops_per_step: float
    num_devices: int
    peak: float | None
    _time: float = dataclasses.field(default_factory=time.perf_counter)
    _step: int = 0

    def reset(self, step: int) -> None:
        self._time, self._step = time.perf_counter(), step

    def exclude(self, seconds: float) -> None:
        """Leave out time spent on other work (validation, evaluators) from the window."""
        self._time += seconds

    def measure(self, step: int) -> dict[str, float | None]:
        now = time.perf_counter()
        steps, seconds = step - self._step, max(now - self._time, 1e-9)
        self._time, self._step = now, step
        examples_per_sec = steps * self.batch_size / seconds
        tflops = steps * self.flops_per_step / seconds / self.num_devices / 1e12
        return {
            "examples_per_sec": examples_per_sec,
            "examples_per_sec_per_device": examples_per_sec / self.num_devices,
            "tflops_per_sec_per_device": tflops,
            "mfu": None if self.peak is None else tflops * 1e12 / self.peak,
            "seconds_per_step": seconds / max(steps, 1),
        }


def _host_metrics(metrics: dict[str, jax.Array]) -> dict[str, float]:
    return {k: float(v) for k, v in jax.device_get(metrics).items()}


def restore_or_init(
    setup: TrainSetup, checkpointer: ckpt.Checkpointer, data_iterator: Any
) -> tuple[State, str]:
    """The documented initialisation order; returns the state and where it came from."""
    config = setup.config
    latest = checkpointer.latest_step()
    if latest is not None:
        state = checkpointer.restore(latest, setup.abstract_state, data_iterator)
        return state, f"resumed from {checkpointer.directory}/{latest}"
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


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Train ``config`` in ``workdir`` (resuming if it holds checkpoints); returns the last
    logged metrics."""
    from sycoca_jax.data import pipeline

    for name in config.evals.keys():
        registry.resolve(config, name)  # a bad eval entry fails now, not after hours of training
    mesh = sharding.make_mesh(config.mesh.shape)
    train_iter = pipeline.make_train_iterator(config)
    num_examples = pipeline.num_train_examples(config)
    setup = make_setup(config, mesh, num_examples)
    checkpointer = ckpt.Checkpointer(workdir, config.keep_checkpoints)
    writer = MetricWriter(workdir)
    state, origin = restore_or_init(setup, checkpointer, train_iter)
    start_step = int(jax.device_get(state["step"]))
    logging.info("%s at step %d of %d", origin, start_step, setup.total_steps)
    if start_step >= setup.total_steps:
        logging.info("nothing to do: the run is complete")
        for resource in (checkpointer, writer, train_iter):
            resource.close()
        return {}
    compiled, compile_report = compile_train_step(setup)
    # Hosts finish compiling at different times (persistent-cache hits, load); the step's first
    # collectives then set up their communicators with short timeouts (gloo on CPU: 30 s).
    wait_for_every_process("sycoca_train_step_compiled")
    eval_step = make_eval_step(setup)
    flops_per_step = flops.train_flops_per_example(config.model) * config.batch_size
    meter = Throughput(
        config.batch_size, flops_per_step, mesh.size, hardware.peak_flops_per_device()
    )
    last: dict[str, float] = {}

    def save(step: int, force: bool = False) -> None:
        checkpointer.save(step, state, train_iter, config, force=force)

    def log(step: int, metrics: dict[str, float]) -> None:
        record = {**metrics, **meter.measure(step), **train_iter.stats.metrics()}
        record["skipped_records"] = record.pop("data/skipped_records")
        for key in ("loss/itc", "loss/caption", "loss/tgmim"):
            record.setdefault(key, None)
        writer.write(step, record)
        last.clear()
        last.update(record)
        remaining = (setup.total_steps - step) * record["seconds_per_step"]
        logging.info(
            "step %d/%d (%.0f%%) loss %.4f | %.1f ex/s | ETA %s",
            step,
            setup.total_steps,
            100 * step / setup.total_steps,
            record["loss"],
            record["examples_per_sec"],
            _format_eta(remaining),
        )

    if start_step == 0:
        writer.write(0, {f"compile/{k}": v for k, v in compile_report.items()})
    meter.reset(start_step)
    # The previous step's loss terms (still on device), checked one step late so the host never
    # waits for the step it has just dispatched.
    pending: tuple[int, dict] | None = None
    step = start_step
    try:
        with StopSignal() as stop:
            while step < setup.total_steps:
                host_batch = next(train_iter)
                state, metrics = compiled(state, pipeline.make_global_batch(host_batch, mesh))
                step += 1
                if pending is not None:
                    check_finite(pending[0], _host_metrics(pending[1]))
                pending = (step, {k: v for k, v in metrics.items() if k.startswith("loss")})
                if _is_log_step(step, config, setup.total_steps):
                    host = _host_metrics(metrics)
                    host["data/batch_fingerprint"] = batch_fingerprint(host_batch)
                    check_finite(step, host)
                    log(step, host)
                last_step = step == setup.total_steps
                stopping = stop.should_stop(step)  # once per step on every process
                if stopping or last_step or step % config.checkpoint_every_steps == 0:
                    check_finite(pending[0], _host_metrics(pending[1]))  # never save a bad state
                    save(step, force=stopping or last_step)
                if stopping:
                    break
                # Evaluations after the checkpoint: a failing evaluator loses no training.
                started = time.perf_counter()
                if config.eval_every_steps and step % config.eval_every_steps == 0:
                    writer.write(step, validation_metrics(setup, eval_step, state["params"]))
                due = registry.due(config, step, last_step)
                if due:
                    placement = sharding.Placement(mesh, setup.rules)
                    context = EvalContext.for_model(setup.model, state["params"], config, placement)
                    results = registry.run(context, due)
                    writer.write(step, registry.flatten(results))
                    registry.write_results(workdir, step, results)
                meter.exclude(time.perf_counter() - started)
    finally:
        # Whatever ended the loop, let an in-flight checkpoint finish before exiting.
        checkpointer.wait()
        checkpointer.close()
        writer.close()
        train_iter.close()
    return last


def batch_fingerprint(host_batch: dict[str, np.ndarray]) -> int:
    """CRC32 of this process's captions in the batch: equal across runs ⇔ same data order."""
    return zlib.crc32(np.ascontiguousarray(host_batch["tokens"]).tobytes())


def _is_log_step(step: int, config: ml_collections.ConfigDict, total_steps: int) -> bool:
    return step == 1 or step % config.log_every_steps == 0 or step == total_steps


def _full_on_every_process(mask: np.ndarray) -> bool:
    """Whether no process's part of the batch holds padding. Every process must take the same
    decision, or those that skip a batch leave the others waiting in its collectives: processes
    hold unequal shares of the split (and bad records mask rows anywhere), so they ask each other
    (one small all-gather per validation batch, only when there are several processes)."""
    full = bool(np.all(mask))
    if jax.process_count() == 1:
        return full
    return bool(np.all(multihost_utils.process_allgather(np.asarray(full, np.int32))))


def validation_metrics(setup: TrainSetup, eval_step: Callable, params: Any) -> dict[str, float]:
    """Mean losses over the first ``config.eval_batches`` full batches of the eval split
    (the padded last batch is left out: its placeholder rows would enter the contrastive loss)."""
    from sycoca_jax.data import pipeline

    config = setup.config
    dataset = pipeline.make_eval_dataset(config, "validation")
    totals: dict[str, float] = {}
    count = 0
    for host_batch in dataset:
        if count >= config.eval_batches:
            break
        if not _full_on_every_process(host_batch.pop("mask")):
            continue
        batch = pipeline.make_global_batch(host_batch, setup.mesh)
        for key, value in _host_metrics(eval_step(params, batch)).items():
            totals[key] = totals.get(key, 0.0) + value
        count += 1
    return {f"val/{k}": v / count for k, v in totals.items()} if count else {}
