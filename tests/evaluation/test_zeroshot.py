"""Zero-shot classification: prompts, ensembled class embeddings, and a run on the small split."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from sycoca_jax import sharding
from sycoca_jax.data.tokenizer import load_tokenizer
from sycoca_jax.evaluation import common, prompts, zeroshot
from sycoca_jax.models.layers import l2_normalize
from tests.helpers import tiny_config


@pytest.fixture(scope="module")
def context(data_dir, tiny_model, tiny_params):
    config = tiny_config(data_dir)
    mesh = sharding.make_mesh((-1, 1, 1))
    return common.EvalContext(tiny_model, tiny_params, config, mesh, sharding.logical_rules("fsdp"))


def test_prompt_sets():
    assert len(prompts.CLIP_IMAGENET) == len(set(prompts.CLIP_IMAGENET)) == 80
    assert prompts.prompts("orange square", prompts.SHAPES)[0] == (
        "the largest shape is an orange square"
    )
    names = prompts.readable_imagenet_names()
    assert len(names) == 1000 and names[:2] == ["tench", "goldfish"]


def test_classifier_is_the_normalised_mean_of_prompt_embeddings(context):
    names = ["red circle", "blue square", "green star"]
    weights = zeroshot.classifier_weights(context, names, prompts.SHAPES, chunk=8)
    assert weights.shape == (3, context.config.model.embed_dim)
    np.testing.assert_allclose(np.linalg.norm(weights, axis=1), 1.0, rtol=1e-5)
    tokenizer = load_tokenizer(None, context.config.data.name)
    tokens = tokenizer.tokenize_batch(prompts.prompts("blue square", prompts.SHAPES), 24)
    model = context.model
    direct = model.apply({"params": context.params}, tokens, method=model.encode_text)["embedding"]
    expected = np.asarray(l2_normalize(jax.numpy.mean(direct, axis=0)))
    np.testing.assert_allclose(weights[1], expected, atol=1e-5)


def test_run_counts_every_test_image(context):
    entry = context.config.evals.shapes_zeroshot.copy_and_resolve_references()
    entry.dataset = context.config.data.name
    entry.batch_size = 32
    result = zeroshot.run(context, entry)
    assert result["num_examples"] == 40 and result["num_classes"] == 30
    assert 0 <= result["top1"] <= result["top5"] <= 1
    assert result["chance_top1"] == pytest.approx(1 / 30)
