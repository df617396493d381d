r"""Evaluate a checkpoint on the downstream tasks of ``config.evals``.

  python -m sycoca_jax.evaluate --config=configs/sycoca.py:tiny --workdir=/tmp/sycoca_tiny \
      [--checkpoint=PATH] [--step=N] [--evals=zeroshot,retrieval,captioning]

``--evals`` names entries of ``config.evals`` or kinds (all entries of that kind), and the model
must be able to run each (captioning needs a captioning head); by default every entry the model
can run runs (the others are dropped with one log line). Results go to stdout,
``<workdir>/eval_results.json`` and ``<workdir>/metrics.jsonl``.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import ml_collections
from absl import flags
from flax import linen as nn

from sycoca_jax import binaries, sharding
from sycoca_jax import checkpoint as ckpt
from sycoca_jax.evaluation import common, registry
from sycoca_jax.metrics import MetricWriter
from sycoca_jax.models import build


def load_for_eval(
    config: ml_collections.ConfigDict, path: str, step: int | None = None
) -> tuple[common.EvalContext, int]:
    """The model of ``config`` with a checkpoint's parameters, sharded on the config's mesh."""
    placement = sharding.Placement.from_config(config.mesh)
    model = build.from_config(config.model)
    boxed = build.abstract_params(model, boxed=True)
    step, found = ckpt.params_metadata(path, step)
    mismatch = ckpt.describe_mismatch(nn.unbox(boxed), found)
    if mismatch:
        raise ckpt.IncompatibleCheckpointError(
            f"checkpoint {path} (step {step}) does not fit this config's model:\n{mismatch}"
        )
    shardings = sharding.shardings_from_boxed(boxed, placement.mesh, placement.rules)
    params = ckpt.load_params(path, step=step, sharding=shardings)
    return common.EvalContext.for_model(model, params, config, placement), step


def evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    checkpoint: str | None = None,
    step: int | None = None,
    requested: list[str] | None = None,
) -> dict[str, Any]:
    """Runs the entries of ``config.evals`` (all, or those ``requested`` by name or kind, which
    the model must be able to run) on a checkpoint; each entry's results are written to the
    workdir as soon as it finishes, so a later failure loses none of them."""
    names = registry.select(config, requested)
    predictors = registry.config_predictors(config)
    explicit = True if requested else None
    # Bad or impossible entries fail, and the workdir is checked, before anything is loaded.
    names = [n for n in names if registry.resolve(config, n, predictors, explicit) is not None]
    registry.check_writable(workdir)
    context, step = load_for_eval(config, checkpoint or workdir, step)
    results: dict[str, Any] = {}
    try:
        for name in names:
            computed = registry.run(context, [name])
            registry.write_results(workdir, step, computed)
            results.update(computed)
    finally:
        if results:
            writer = MetricWriter(workdir, tensorboard=False)
            writer.write(step, registry.flatten(results))
            writer.close()
    return {**results, "step": step}


def main(f: flags.FlagValues) -> None:
    requested = [e for e in (f.evals or "").split(",") if e]
    results = evaluate(f.config, f.workdir, f.checkpoint, f.step, requested)
    if jax.process_index() == 0:
        print(json.dumps(results, indent=2, default=str))


def define_flags() -> None:
    binaries.define_flags("Config file.", "Where results go (and checkpoints are read from).")
    flags.DEFINE_string("checkpoint", None, "Checkpoint dir (default: the workdir's).")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
    flags.DEFINE_string("evals", "", "Comma-separated entries or kinds of config.evals.")


def run() -> None:
    """Console-script entry point (``sycoca-eval``)."""
    binaries.run(main, define_flags)


if __name__ == "__main__":
    run()
