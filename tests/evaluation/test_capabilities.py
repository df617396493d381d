"""Every objective runs with the default evaluations: what a model cannot run (captioning on a
CLIP model) is dropped with one log line when it comes from the defaults, and refused before any
work when asked for explicitly; ``evaluate`` writes whatever it computed."""

from __future__ import annotations

import json
import logging

import pytest
from absl import logging as absl_logging

from sycoca_jax import evaluate, train
from sycoca_jax.evaluation import registry, zeroshot
from sycoca_jax.metrics import read_metrics
from tests.helpers import tiny_config


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def clip_config(data_dir: str):
    config = tiny_config(data_dir, arg="tiny,objective=clip")
    config.total_steps = 4
    config.optim.warmup_steps = 1
    config.log_every_steps = 2
    config.eval_every_steps = 0
    config.checkpoint_every_steps = 4
    config.batch_size = 16
    for entry in config.evals.values():
        entry.batch_size = 40  # the whole test split in one batch
        entry.every_steps = 2
    return config


@pytest.fixture(scope="module")
def clip_run(data_dir, tmp_path_factory):
    """4 steps of the tiny CLIP objective with the default evaluations every 2 steps:
    (config, workdir, log lines)."""
    workdir = tmp_path_factory.mktemp("clip")
    config = clip_config(data_dir)
    handler, logger = _Lines(), logging.getLogger("absl")
    verbosity = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.INFO)
    logger.addHandler(handler)
    try:
        train.train_and_evaluate(config, str(workdir))
    finally:
        logger.removeHandler(handler)
        absl_logging.set_verbosity(verbosity)
    return config, workdir, handler.lines


def test_clip_trains_with_the_default_evaluations(clip_run):
    _, workdir, lines = clip_run
    dropped = [line for line in lines if "dropped" in line]
    assert len(dropped) == 1 and dropped[0].startswith("eval shapes_captioning dropped:")
    assert "['caption']" in dropped[0]
    stored = json.loads((workdir / "eval_results.json").read_text())
    # The mechanism evaluation runs on every objective (scores as attentive masking would).
    expected = {"shapes_zeroshot", "shapes_retrieval", "shapes_mechanism", "step"}
    assert set(stored) == expected and stored["step"] == 4
    # The compositional scenes are reported apart (the small build's test split has some).
    zero_shot = stored["shapes_zeroshot"]
    assert zero_shot["compositional/num_examples"] + zero_shot["seen/num_examples"] == 40
    logged = [r for r in read_metrics(str(workdir)) if "eval/shapes_zeroshot/top1" in r]
    assert [r["step"] for r in logged] == [2, 4]
    assert not any(k.startswith("eval/shapes_captioning") for r in logged for k in r)


def test_a_required_evaluation_the_model_cannot_run_fails_before_training(data_dir, tmp_path):
    config = clip_config(data_dir)
    config.evals.shapes_captioning.required = True
    with pytest.raises(ValueError) as raised:
        train.train_and_evaluate(config, str(tmp_path))
    assert str(raised.value) == (
        "config.evals.shapes_captioning (captioning) needs the predict function(s) ['caption'], "
        "which this model (objective=clip) lacks; drop it from --evals or config.evals"
    )
    assert not (tmp_path / "checkpoints").exists()


def test_evaluate_a_clip_checkpoint(clip_run, tmp_path, monkeypatch):
    config, workdir, _ = clip_run
    # Asked for explicitly: refused before anything is loaded or written.
    for requested in (["captioning"], ["zeroshot", "shapes_captioning"]):
        with pytest.raises(ValueError, match=r"needs the predict function\(s\) \['caption'\]"):
            evaluate.evaluate(config, str(tmp_path), checkpoint=str(workdir), requested=requested)
        assert not (tmp_path / "eval_results.json").exists()

    # By default: the captioning entry is dropped, the others are computed and written.
    results = evaluate.evaluate(config, str(tmp_path / "all"), checkpoint=str(workdir))
    assert set(results) == {"shapes_zeroshot", "shapes_retrieval", "shapes_mechanism", "step"}
    stored = json.loads((tmp_path / "all" / "eval_results.json").read_text())
    assert stored["shapes_retrieval"]["mean_recall"] == results["shapes_retrieval"]["mean_recall"]

    # An evaluator failing midway loses none of the entries finished before it.
    def fails(context, settings):
        raise RuntimeError("evaluator broke")

    broken = registry.Evaluator(zeroshot.Settings, fails, zeroshot.NEEDS)
    monkeypatch.setitem(registry.EVALUATORS, "zeroshot", broken)
    with pytest.raises(RuntimeError, match="evaluator broke"):
        evaluate.evaluate(config, str(tmp_path / "partial"), checkpoint=str(workdir))
    stored = json.loads((tmp_path / "partial" / "eval_results.json").read_text())
    assert set(stored) == {"shapes_mechanism", "shapes_retrieval", "step"}  # (sorted order)
