"""Zero-shot classification: prompts, ensembled class embeddings, and a run on the small split."""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
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
    placement = sharding.Placement.from_config(config.mesh)
    return common.EvalContext.for_model(tiny_model, tiny_params, config, placement)


def test_prompt_sets():
    assert len(prompts.CLIP_IMAGENET) == len(set(prompts.CLIP_IMAGENET)) == 80
    assert prompts.prompts("orange square", prompts.SHAPES)[0] == (
        "the largest shape is an orange square"
    )
    names = prompts.readable_imagenet_names()
    assert len(names) == 1000 and names[:2] == ["tench", "goldfish"]


def test_classifier_is_the_normalised_mean_of_prompt_embeddings(context, tiny_model):
    names = ["red circle", "blue square", "green star"]
    weights = zeroshot.classifier_weights(context, names, prompts.SHAPES, chunk=8)
    assert weights.shape == (3, context.config.model.embed_dim)
    np.testing.assert_allclose(np.linalg.norm(weights, axis=1), 1.0, rtol=1e-5)
    tokenizer = load_tokenizer(None, context.config.data.name)
    tokens = tokenizer.tokenize_batch(prompts.prompts("blue square", prompts.SHAPES), 24)
    direct = tiny_model.apply({"params": context.params}, tokens, method=tiny_model.encode_text)
    direct = direct["embedding"]
    expected = np.asarray(l2_normalize(jax.numpy.mean(direct, axis=0)))
    np.testing.assert_allclose(weights[1], expected, atol=1e-5)


def test_run_counts_every_test_image(context):
    settings = zeroshot.Settings(
        dataset=context.config.data.name, templates="shapes", batch_size=32
    )
    result = zeroshot.run(context, settings)
    assert result["num_examples"] == 40 and result["num_classes"] == 30
    assert 0 <= result["top1"] <= result["top5"] <= 1
    assert result["chance_top1"] == pytest.approx(1 / 30)


@contextlib.contextmanager
def count_compilations():
    """Counts XLA compilations in the block (``jax.monitoring``'s backend-compile events)."""
    events: list[str] = []

    def listener(name: str, duration: float, **kwargs) -> None:
        if name == "/jax/core/compile/backend_compile_duration":
            events.append(name)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield events
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def test_evaluating_again_compiles_nothing(context, tiny_model, tiny_params):
    """The training loop builds a new context for each evaluation, with new parameter arrays:
    the predict functions' compilations are reused."""
    settings = zeroshot.Settings(
        dataset=context.config.data.name, templates="shapes", batch_size=24
    )
    with count_compilations() as first:
        before = zeroshot.run(context, settings)
    params = jax.tree.map(jnp.copy, tiny_params)
    again = common.EvalContext.for_model(
        tiny_model.clone(), params, context.config, context.placement
    )
    with count_compilations() as second:
        after = zeroshot.run(again, settings)
    assert first and not second  # no other test uses batch size 24: the first run compiled
    assert after == before
