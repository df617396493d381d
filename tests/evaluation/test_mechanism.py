"""The mechanism evaluator: its targets come from the generator, its scores from the model."""

from __future__ import annotations

import jax
import ml_collections
import numpy as np
import pytest

from sycoca_jax import sharding
from sycoca_jax.data import shapes, shapes_builder, sources
from sycoca_jax.data.tokenizer import load_tokenizer
from sycoca_jax.evaluation import common, mechanism, registry
from sycoca_jax.models import masking
from tests.helpers import SMALL, SMALL_NAME, tiny_config


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(None, "sycoca_shapes")


def test_word_tokens_map_words_to_their_pieces(tokenizer):
    caption = "a medium purple circle at centre and a small red triangle at top left"
    tokens, spans = mechanism.word_tokens(tokenizer, caption, 24)
    np.testing.assert_array_equal(tokens, tokenizer.tokenize(caption, 24))
    for word, span in zip(caption.split(), spans, strict=True):
        assert tokenizer.decode(tokens[span]) == word
    short_tokens, short = mechanism.word_tokens(tokenizer, caption, 6)  # bos + 5 pieces + eos
    assert [p for span in short for p in span] == [1, 2, 3, 4, 5]
    assert short_tokens[6] == 2 and not short[-1]


def _targets(tokenizer, record):
    step = mechanism.ObjectTargets(
        SMALL_NAME, sources.dataset_spec(SMALL_NAME), tokenizer, 24, 64, 8
    )
    return step.apply(record)


def test_object_targets_come_from_the_generated_scene(data_dir, tokenizer):
    source = sources.open_source(SMALL_NAME, "test", data_dir)
    for record in [source[i] for i in range(6)]:
        out = _targets(tokenizer, dict(record))
        split, index = shapes_builder.parse_id(record["id"])
        scene = shapes_builder.regenerate(SMALL, split, index).scene
        k = len(scene.shapes)
        expected = shapes.patch_coverage(shapes.object_masks(scene, 64), 8)
        np.testing.assert_allclose(out["coverage"][:k], expected)
        assert not out["coverage"][k:].any()
        for i, shape in enumerate(scene.shapes):
            colour = out["tokens"][:-1][out["colour_tokens"][i]]
            kind = out["tokens"][:-1][out["kind_tokens"][i]]
            assert tokenizer.decode(colour) == shape.colour
            assert tokenizer.decode(kind) == shape.kind
            assert out["same_colour"][i, i] and out["same_kind"][i, i]


def test_a_build_from_other_generator_code_is_refused(data_dir, tokenizer):
    record = dict(sources.open_source(SMALL_NAME, "test", data_dir)[0])
    record["captions"] = np.array([b"a large blue star in the centre"] * 5, object)
    with pytest.raises(ValueError, match="regenerate"):
        _targets(tokenizer, record)


def test_relevance_inputs_give_the_training_forward_relevance(tiny_model, tiny_params, tiny_inputs):
    images, tokens = tiny_inputs

    @jax.jit
    def both(params):
        variables = {"params": params}
        out = tiny_model.apply(variables, images, tokens, rngs={"masking": jax.random.key(0)})
        inputs = tiny_model.apply(variables, images, tokens, method=tiny_model.relevance_inputs)
        relevance = masking.relevance_scores(
            inputs["patch_embeddings"],
            inputs["token_embeddings"],
            inputs["token_valid"],
            tiny_model.score_mode,
            inputs["temperature"],
        )
        return relevance, out["relevance"]

    relevance, trained = both(tiny_params)
    np.testing.assert_allclose(relevance, trained, rtol=1e-5, atol=1e-6)


def test_evaluator_reports_metrics_with_their_random_baselines(data_dir, tiny_model, tiny_params):
    config = tiny_config(data_dir)
    config.evals.shapes_mechanism.batch_size = 16
    mesh = sharding.make_mesh(config.mesh.shape)
    rules = sharding.logical_rules(config.mesh.rules)
    context = common.EvalContext(tiny_model, tiny_params, config, mesh, rules)
    result = registry.run(context, ["shapes_mechanism"])["shapes_mechanism"]
    assert result["num_examples"] == SMALL.num_test
    assert result["score_mode"] == "max_sim"
    # The model's scores are max_sim over every real token: the NumPy probe recomputes them.
    assert result["relevance_auroc"] == pytest.approx(result["probe_max_sim_auroc"], abs=1e-6)
    assert result["random_caption_keep_precision"] == pytest.approx(result["object_patch_share"])
    assert result["random_tgmim_mask_recall"] == pytest.approx(result["tgmim_masked"] / 64)
    for key in ("relevance_auroc", "caption_keep_precision", "colour_word_hit", "kind_word_hit"):
        assert 0.0 <= result[key] <= 1.0
    assert 0 < result["random_colour_word_hit"] < result["random_colour_word_object_hit"] < 1


def test_check_refuses_data_without_object_positions():
    entry = ml_collections.ConfigDict(
        dict(kind="mechanism", dataset="coco_captions", split="test", score_mode=None)
    )
    with pytest.raises(ValueError, match="sycoca_shapes"):
        mechanism.check(entry)
    entry.dataset, entry.score_mode = "sycoca_shapes", "telepathy"
    with pytest.raises(ValueError, match="score_mode"):
        mechanism.check(entry)
