"""The evaluation binary's library path, and evaluators running inside training."""

from __future__ import annotations

import json
import os

import pytest

from sycoca_jax import checkpoint as ckpt
from sycoca_jax import evaluate
from sycoca_jax.evaluation import registry
from sycoca_jax.metrics import read_metrics


def test_training_ran_the_configured_evals_at_the_end(tiny_pretrained):
    config, workdir, _ = tiny_pretrained
    results = json.loads(open(os.path.join(workdir, "eval_results.json")).read())
    assert results["step"] == 60
    assert set(config.evals.keys()) <= set(results)
    assert results["shapes_zeroshot"]["num_examples"] == 40
    assert 0 <= results["shapes_retrieval"]["image_to_text_r1"] <= 1
    assert isinstance(results["shapes_captioning"]["cider"], float)
    logged = {k for r in read_metrics(workdir) for k in r}
    assert "eval/shapes_zeroshot/top1" in logged and "eval/shapes_captioning/bleu_4" in logged


def test_evaluate_selected_kinds_from_a_checkpoint(tiny_pretrained, tmp_path):
    config, workdir, _ = tiny_pretrained
    results = evaluate.evaluate(
        config, str(tmp_path), checkpoint=workdir, step=30, requested=["zeroshot", "retrieval"]
    )
    assert results["step"] == 30
    assert set(results) == {"shapes_zeroshot", "shapes_retrieval", "step"}
    written = json.loads((tmp_path / "eval_results.json").read_text())
    assert written["shapes_zeroshot"]["top1"] == results["shapes_zeroshot"]["top1"]
    assert written["shapes_zeroshot"]["step"] == 30


def test_bad_requests_and_checkpoints_are_named(tiny_pretrained, tmp_path):
    config, workdir, _ = tiny_pretrained
    with pytest.raises(ValueError, match="unknown.*'vqa'"):
        registry.select(config, ["vqa"])
    bad = config.copy_and_resolve_references()
    bad.evals.shapes_zeroshot.templates = "imagenet21k"
    with pytest.raises(ValueError, match="shapes_zeroshot: templates='imagenet21k'; choose from"):
        registry.resolve(bad, "shapes_zeroshot")
    other = config.copy_and_resolve_references()
    other.model.embed_dim = 32
    with pytest.raises(ckpt.IncompatibleCheckpointError, match="image_projection/kernel"):
        evaluate.evaluate(other, str(tmp_path), checkpoint=workdir, requested=["zeroshot"])
