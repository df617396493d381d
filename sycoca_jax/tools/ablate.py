r"""One command for the paper's component ablation (SyCoCa Table 5) over several seeds.

  python -m sycoca_jax.tools.ablate --data=shapes --seeds=3 --workdir=/tmp/ablation_shapes \
      [--variants=clip,coca,...] [--variant=NAME:OBJECTIVE,key=value,...] [--steps=N] \
      [--parallel=2]

Trains and evaluates every (variant, seed) in ``<workdir>/<variant>/seed<k>`` with
``configs/sycoca.py:<size>,objective=...,data=...`` (seed k sets ``config.seed`` and the data
order), then writes ``ablation.json`` (every run's metrics and the summary), ``ablation.md``
(mean ± 95 % Student-t interval per metric, and each variant's paired difference from CoCa with
the same seed) and ``ablation.png``. Finished runs are skipped, so rerunning the command resumes
an interrupted study (an interrupted run resumes from its checkpoint) and adding variants or
seeds only trains the new runs; ``--reevaluate=mechanism`` evaluates finished runs again (e.g.
after a metric was added).

Variants (``ablation_variants.VARIANTS``): the rows of Table 5 -- ``clip`` (ITC only), ``coca``,
``coca_attentive_caption`` (CoCa whose captioner sees the attentively kept patches),
``sycoca_random_tgmim`` (SyCoCa whose TG-MIM hides random patches; the captioner keeps its
attentive masking) and ``sycoca`` -- plus ``coca_random_caption``. ``--variant`` defines more
from config overrides, e.g. ``--variant=keep25:sycoca,model.caption_keep_ratio=0.25``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

from absl import app, flags, logging

from sycoca_jax.tools import ablation_report, ablation_variants

REPO_CONFIG = pathlib.Path(__file__).resolve().parents[2] / "configs" / "sycoca.py"
DONE_FILE = "ablation_run.json"
SPEC_FILE = "run_spec.json"
SINGLE_THREAD_XLA = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """Everything that defines one run; stored in its directory so a resumed study can tell
    whether a finished run is the one asked for."""

    variant: str
    seed: int
    objective: str
    overrides: dict[str, Any]
    data: str
    size: str
    steps: int | None
    config_file: str
    mechanism_every: int
    evals: tuple[str, ...] = ()  # entry names or kinds of config.evals to keep; () = all
    eval_every: int | None = None  # steps between the other evaluations (0: at the end only)

    def workdir(self, root: str | os.PathLike) -> pathlib.Path:
        return pathlib.Path(root) / self.variant / f"seed{self.seed}"

    def identity(self) -> dict[str, Any]:
        """The fields that must match for a finished run to count (not where code lives), as
        JSON would give them back."""
        out = dataclasses.asdict(self)
        out.pop("config_file")
        return json.loads(json.dumps(out))


def build_config(spec: RunSpec) -> Any:
    """The run's config: the config file's ``<size>,objective,data``, the seed, the overrides;
    evaluations a model cannot run are dropped, the mechanism one runs every
    ``mechanism_every`` steps (its curve shows from when relevance beats chance)."""
    from sycoca_jax.config_args import load_config
    from sycoca_jax.evaluation import registry

    config = load_config(
        f"{spec.config_file}:{spec.size},objective={spec.objective},data={spec.data}"
    )
    config.seed = spec.seed
    config.data.shuffle_seed = spec.seed
    if spec.steps is not None:
        config.total_steps = spec.steps
        config.optim.warmup_steps = min(config.optim.warmup_steps, max(spec.steps // 10, 1))
    for key, value in spec.overrides.items():
        ablation_variants.set_override(config, key, value)
    total = config.total_steps
    if spec.evals:
        for name in list(config.evals):
            if name not in spec.evals and config.evals[name].kind not in spec.evals:
                del config.evals[name]
    predictors = registry.config_predictors(config)
    for name in [n for n in config.evals if registry.missing(config.evals[n].kind, predictors)]:
        del config.evals[name]  # the model cannot run it (e.g. captioning on a CLIP model)
    for name in config.evals:
        entry = config.evals[name]
        every = entry.every_steps if spec.eval_every is None else spec.eval_every
        every = spec.mechanism_every if entry.kind == "mechanism" else every
        entry.every_steps = min(every or total, total) if total else every
    config.checkpoint_every_steps = min(config.checkpoint_every_steps, total or 1 << 30)
    return config


def run_one(spec: RunSpec, root: str) -> dict[str, Any]:
    """Train (resuming), evaluate what the training loop did not finish, record the result."""
    from sycoca_jax import checkpoint as ckpt
    from sycoca_jax import evaluate
    from sycoca_jax.train import pretrain

    workdir = spec.workdir(root)
    config = build_config(spec)
    pretrain.train_and_evaluate(config, str(workdir))
    final = config.total_steps
    reached, _ = ckpt.params_metadata(str(workdir))
    if reached != final:  # stopped early (SIGTERM): not a finished run
        raise SystemExit(f"{workdir}: training stopped at step {reached} of {final}; rerun")
    results_path = workdir / "eval_results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    missing = [n for n in config.evals if results.get(n, {}).get("step") != final]
    if missing:
        logging.info("evaluating %s at the final checkpoint", missing)
        evaluate.evaluate(config, str(workdir), step=final, requested=missing)
        results = json.loads(results_path.read_text())
    record = {
        "spec": spec.identity(),
        "results": {n: results[n] for n in config.evals},
        "train": ablation_report.last_train_metrics(workdir / "metrics.jsonl"),
    }
    (workdir / DONE_FILE).write_text(json.dumps(record, indent=2, default=str) + "\n")
    return record


def reevaluate(spec: RunSpec, root: str, requested: Sequence[str]) -> dict[str, Any]:
    """Evaluates a finished run's final checkpoint again with today's evaluators (entries or
    kinds ``requested``), e.g. after a metric was added, and updates its record."""
    from sycoca_jax import evaluate

    record = finished(spec, root)
    if record is None:
        raise ValueError(f"{spec.workdir(root)} has no finished run to evaluate again")
    config = build_config(spec)
    names = [n for n in config.evals if n in requested or config.evals[n].kind in requested]
    results = evaluate.evaluate(
        config, str(spec.workdir(root)), step=config.total_steps, requested=names
    )
    record["results"].update({n: {**results[n], "step": results["step"]} for n in names})
    (spec.workdir(root) / DONE_FILE).write_text(json.dumps(record, indent=2, default=str) + "\n")
    return record


def finished(spec: RunSpec, root: str) -> dict[str, Any] | None:
    """The run's record if it finished as ``spec`` asks; an error if it finished otherwise."""
    path = spec.workdir(root) / DONE_FILE
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    if record["spec"] != spec.identity():
        raise ValueError(
            f"{path.parent} holds a finished run of {record['spec']}, not {spec.identity()}; "
            "use another --workdir (or delete that run to redo it)"
        )
    return record


def _launch(
    spec: RunSpec, root: str, slot: int, single_threaded: bool, pin: bool
) -> subprocess.Popen:
    """Starts one run in its own process; single-threaded runs of a parallel study each get a
    core of their own (``pin``)."""
    workdir = spec.workdir(root)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / SPEC_FILE).write_text(json.dumps(dataclasses.asdict(spec), indent=2) + "\n")
    env = dict(os.environ)
    preexec = None
    if single_threaded:
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {SINGLE_THREAD_XLA}".strip()
    if single_threaded and pin:
        cpus = sorted(os.sched_getaffinity(0))
        core = cpus[slot % len(cpus)]

        def preexec():
            os.sched_setaffinity(0, {core})

    command = [
        sys.executable,
        "-m",
        "sycoca_jax.tools.ablate",
        f"--run_spec={workdir / SPEC_FILE}",
        f"--workdir={root}",
    ]
    log = open(workdir / "log.txt", "a")  # noqa: SIM115 (closed when the run ends)
    process = subprocess.Popen(
        command, stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=preexec
    )
    process.log = log  # type: ignore[attr-defined]
    return process


def run_all(
    specs: Sequence[RunSpec], root: str, parallel: int = 1, single_threaded: bool = False
) -> list[str]:
    """Runs the unfinished specs, ``parallel`` at a time, each in its own process (``0``: one
    after another in this process); returns the work directories of runs that failed (their
    logs say why)."""
    pending = [s for s in specs if finished(s, root) is None]
    skipped = len(specs) - len(pending)
    if skipped:
        logging.info("%d of %d runs already finished", skipped, len(specs))
    if parallel == 0:
        for spec in pending:
            spec.workdir(root).mkdir(parents=True, exist_ok=True)
            run_one(spec, root)
        return []
    running: dict[int, tuple[RunSpec, subprocess.Popen, float]] = {}
    failed = []
    while pending or running:
        free = [slot for slot in range(parallel) if slot not in running]
        while pending and free:
            spec = pending.pop(0)
            slot = free.pop(0)
            logging.info("start %s seed %d (slot %d)", spec.variant, spec.seed, slot)
            process = _launch(spec, root, slot, single_threaded, pin=parallel > 1)
            running[slot] = (spec, process, time.time())
        time.sleep(2)
        for slot, (spec, process, started) in list(running.items()):
            code = process.poll()
            if code is None:
                continue
            process.log.close()  # type: ignore[attr-defined]
            del running[slot]
            took = time.time() - started
            where = spec.workdir(root)
            if code == 0:
                logging.info("done %s seed %d in %.0f s", spec.variant, spec.seed, took)
            else:
                logging.error(
                    "FAILED %s seed %d (exit %d): see %s/log.txt",
                    spec.variant,
                    spec.seed,
                    code,
                    where,
                )
                failed.append(str(where))
    return failed


def make_specs(
    variants: dict[str, tuple[str, dict[str, Any]]],
    seeds: int,
    *,
    data: str,
    size: str,
    steps: int | None,
    mechanism_every: int,
    common_overrides: dict[str, Any],
    config_file: str,
    evals: Sequence[str] = (),
    eval_every: int | None = None,
) -> list[RunSpec]:
    return [
        RunSpec(
            variant=name,
            seed=seed,
            objective=objective,
            overrides={**common_overrides, **overrides},
            data=data,
            size=size,
            steps=steps,
            config_file=config_file,
            mechanism_every=mechanism_every,
            evals=tuple(evals),
            eval_every=eval_every,
        )
        for seed in range(seeds)
        for name, (objective, overrides) in variants.items()
    ]


# ------------------------------------------------------------------------------------ binary
FLAGS = flags.FLAGS


def define_flags() -> None:
    flags.DEFINE_string("workdir", None, "Where the runs and the report go.")
    flags.DEFINE_enum("data", "shapes", ["shapes", "shapes_clutter"], "Training data.")
    flags.DEFINE_integer("seeds", 3, "Seeds 0..N-1 of every variant.")
    flags.DEFINE_list("variants", [], "Variants to run (default: Table 5's five rows).")
    flags.DEFINE_multi_string("variant", [], "More variants: NAME:OBJECTIVE,key=value,...")
    flags.DEFINE_multi_string("set", [], "key=value override for every run (e.g. data.data_dir).")
    flags.DEFINE_integer("steps", None, "Training steps (default: the config's).")
    flags.DEFINE_string("size", "tiny", "Model size of configs/sycoca.py.")
    flags.DEFINE_string("config_file", str(REPO_CONFIG), "The pretraining config file.")
    flags.DEFINE_integer("mechanism_every", 250, "Steps between mechanism evaluations.")
    flags.DEFINE_integer(
        "eval_every", None, "Steps between the other evaluations (default: the config's; 0: end)."
    )
    flags.DEFINE_list("evals", [], "Entries or kinds of config.evals to run (default: all).")
    flags.DEFINE_integer("parallel", 1, "Runs at a time, each in a process (0: in this one).")
    flags.DEFINE_bool("single_threaded", False, "Each run on one core with one XLA thread.")
    flags.DEFINE_string("baseline", "coca", "Variant the paired differences are taken from.")
    flags.DEFINE_string("report", "ablation", "Report file names: <report>.json/.md/.png.")
    flags.DEFINE_list(
        "reevaluate", [], "Entries or kinds to evaluate again on finished runs (today's code)."
    )
    flags.DEFINE_string("run_spec", None, "(internal) run the one spec in this file")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS.workdir:
        raise app.UsageError("--workdir is required")
    logging.set_verbosity(logging.INFO)
    if FLAGS.run_spec:
        spec = RunSpec(**json.loads(pathlib.Path(FLAGS.run_spec).read_text()))
        run_one(spec, FLAGS.workdir)
        return
    variants = ablation_variants.select_variants(FLAGS.variants, FLAGS.variant)
    common = {}
    for item in FLAGS.set:
        key, eq, value = item.partition("=")
        if not eq:
            raise app.UsageError(f"--set={item!r} is not key=value")
        common[key] = ablation_variants.parse_value(value)
    specs = make_specs(
        variants,
        FLAGS.seeds,
        data=FLAGS.data,
        size=FLAGS.size,
        steps=FLAGS.steps,
        mechanism_every=FLAGS.mechanism_every,
        common_overrides=common,
        config_file=FLAGS.config_file,
        evals=FLAGS.evals,
        eval_every=FLAGS.eval_every,
    )
    for spec in specs:  # a bad override or variant fails now, not after hours of training
        build_config(spec)
        finished(spec, FLAGS.workdir)
    failed = run_all(specs, FLAGS.workdir, FLAGS.parallel, FLAGS.single_threaded)
    if FLAGS.reevaluate:
        for spec in specs:
            if finished(spec, FLAGS.workdir) is not None:
                reevaluate(spec, FLAGS.workdir, FLAGS.reevaluate)
    records = [r for s in specs if (r := finished(s, FLAGS.workdir)) is not None]
    paths = ablation_report.write_report(records, FLAGS.workdir, FLAGS.baseline, FLAGS.report)
    print("\n".join(str(p) for p in paths))
    if failed:
        raise SystemExit(f"{len(failed)} runs failed: {failed}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
