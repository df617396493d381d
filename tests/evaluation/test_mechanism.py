"""The mechanism evaluator: its targets come from the generator, its scores from the model."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from sycoca_jax import sharding
from sycoca_jax.data import shapes, shapes_builder, sources
from sycoca_jax.data.tokenizer import load_tokenizer
from sycoca_jax.evaluation import common, mechanism, object_targets, predict, registry
from sycoca_jax.models import masking
from tests.helpers import SMALL, SMALL_NAME, config_for, tiny_config


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(None, "sycoca_shapes")


def test_word_tokens_map_words_to_their_pieces(tokenizer):
    caption = "a medium purple circle at centre and a small red triangle at top left"
    tokens, spans = object_targets.word_tokens(tokenizer, caption, 24)
    np.testing.assert_array_equal(tokens, tokenizer.tokenize(caption, 24))
    for word, span in zip(caption.split(), spans, strict=True):
        assert tokenizer.decode(tokens[span]) == word
    short_tokens, short = object_targets.word_tokens(tokenizer, caption, 6)  # bos + 5 pieces + eos
    assert [p for span in short for p in span] == [1, 2, 3, 4, 5]
    assert short_tokens[6] == 2 and not short[-1]


def _targets(tokenizer, record):
    step = object_targets.ObjectTargets(
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
    """The predict function the evaluator scores from gives the relevance the training forward
    masks with (the masking predict function reports it)."""
    images, tokens = tiny_inputs
    predictors = predict.for_model(tiny_model)
    with sharding.Placement.from_config(config_for("tiny").mesh).context():
        inputs = predictors.relevance_inputs(tiny_params, images, tokens)
        trained = predictors.masking(tiny_params, images, tokens, jax.random.key(0))["relevance"]
    relevance = masking.relevance_scores(
        inputs["patch_embeddings"],
        inputs["token_embeddings"],
        inputs["token_valid"],
        tiny_model.score_mode,
        inputs["temperature"],
    )
    np.testing.assert_allclose(relevance, trained, rtol=1e-5, atol=1e-6)


def test_occluding_every_patch_but_all_is_the_full_embedding(tiny_model, tiny_params, tiny_inputs):
    """``encode_image_patches`` with every patch is the contrastive embedding; with fewer it
    differs (what the occlusion probe measures)."""
    images, _ = tiny_inputs
    predictors = predict.for_model(tiny_model)
    n = tiny_model.num_patches
    every = np.broadcast_to(np.arange(n), (len(images), n))
    with sharding.Placement.from_config(config_for("tiny").mesh).context():
        full = predictors.encode_images(tiny_params, images)
        same = predictors.encode_image_patches(tiny_params, images, every)
        fewer = predictors.encode_image_patches(tiny_params, images, every[:, 1:])
    np.testing.assert_allclose(same, full, rtol=1e-5, atol=1e-5)
    assert not np.allclose(fewer, full, atol=1e-4)


def test_evaluator_reports_metrics_with_their_random_baselines(data_dir, tiny_model, tiny_params):
    config = tiny_config(data_dir)
    config.evals.shapes_mechanism.batch_size = 16
    placement = sharding.Placement.from_config(config.mesh)
    context = common.EvalContext.for_model(tiny_model, tiny_params, config, placement)
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


def test_settings_refuse_data_without_object_positions_and_bad_fields():
    with pytest.raises(ValueError, match="sycoca_shapes"):
        mechanism.Settings(dataset="coco_captions")
    with pytest.raises(ValueError, match="score_mode"):
        mechanism.Settings(dataset="sycoca_shapes", score_mode="telepathy")
    with pytest.raises(ValueError, match="probes"):
        mechanism.Settings(probes=("telepathy",))
    with pytest.raises(ValueError, match="min_coverage"):
        mechanism.Settings(min_coverage=0.0)


def test_an_entry_on_other_data_fails_when_resolved(data_dir):
    """Entries are checked before anything runs: the training data's dataset is filled in."""
    config = tiny_config(data_dir)
    config.data.name = "coco_captions"
    with pytest.raises(ValueError, match="config.evals.shapes_mechanism: mechanism evaluation"):
        registry.resolve(config, "shapes_mechanism")
