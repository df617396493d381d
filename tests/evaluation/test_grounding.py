"""Mechanism metrics on hand-built scenes whose answers are known."""

from __future__ import annotations

import itertools

import jax
import numpy as np
import pytest

from sycoca_jax.data import shapes
from sycoca_jax.evaluation import grounding


def _scene(n: int = 16, objects=(3, 4, 9)) -> np.ndarray:
    on = np.zeros((1, n), bool)
    on[0, list(objects)] = True
    return on


def test_relevance_planted_on_the_object_gives_precision_one_and_full_recall():
    on = _scene()
    scores = on.astype(np.float32) + 0.01 * np.arange(16)  # object patches score highest
    metrics = grounding.selection_metrics(scores, on, keep=3, masked=3)
    assert metrics["caption_keep_precision"][0] == 1.0
    assert metrics["tgmim_mask_recall"][0] == 1.0
    assert metrics["relevance_auroc"][0] == 1.0
    assert metrics["random_caption_keep_precision"][0] == pytest.approx(3 / 16)
    assert metrics["random_tgmim_mask_recall"][0] == pytest.approx(3 / 16)
    # Keeping more patches than lie on objects caps precision at objects / kept.
    wide = grounding.selection_metrics(scores, on, keep=6, masked=6)
    assert wide["caption_keep_precision"][0] == pytest.approx(0.5)


def test_relevance_planted_on_the_background_scores_zero():
    on = _scene()
    metrics = grounding.selection_metrics(-on.astype(np.float32), on, keep=3, masked=8)
    assert metrics["caption_keep_precision"][0] == 0.0
    assert metrics["tgmim_mask_recall"][0] == 0.0
    assert metrics["relevance_auroc"][0] == 0.0


def test_random_scores_get_the_random_baselines_on_average():
    rng = np.random.default_rng(0)
    on = np.repeat(_scene(), 4000, axis=0)
    metrics = grounding.selection_metrics(rng.random(on.shape), on, keep=8, masked=4)
    assert metrics["caption_keep_precision"].mean() == pytest.approx(3 / 16, abs=0.01)
    assert metrics["tgmim_mask_recall"].mean() == pytest.approx(4 / 16, abs=0.01)
    assert metrics["relevance_auroc"].mean() == pytest.approx(0.5, abs=0.01)


def test_auroc_is_the_pairwise_win_rate_with_ties_half():
    rng = np.random.default_rng(1)
    scores = rng.integers(0, 5, size=40).astype(np.float64)  # many ties
    positive = rng.random(40) < 0.3
    pos, neg = scores[positive], scores[~positive]
    wins = sum(1.0 if p > q else 0.5 if p == q else 0.0 for p, q in itertools.product(pos, neg))
    assert grounding.auroc(scores, positive) == pytest.approx(wins / (len(pos) * len(neg)))
    assert grounding.auroc(np.ones(5), np.array([1, 0, 1, 0, 0], bool)) == 0.5
    assert np.isnan(grounding.auroc(np.arange(4.0), np.zeros(4, bool)))


def test_images_without_objects_are_left_out_of_recall_and_auroc():
    on = np.zeros((2, 8), bool)
    on[1, 2] = True
    metrics = grounding.selection_metrics(np.arange(16.0).reshape(2, 8), on, keep=2, masked=2)
    assert np.isnan(metrics["tgmim_mask_recall"][0])
    assert np.isnan(metrics["relevance_auroc"][0])
    assert metrics["caption_keep_precision"][0] == 0.0
    assert grounding.nanmean(metrics["tgmim_mask_recall"]) == 0.0


def test_top_k_mask_breaks_ties_like_jax_top_k():
    scores = np.array([[0.5, 1.0, 1.0, 0.2, 1.0, 0.5]], np.float32)
    for k in range(1, 6):
        _, indices = jax.lax.top_k(scores, k)
        expected = np.zeros_like(scores, bool)
        expected[0, np.asarray(indices)[0]] = True
        np.testing.assert_array_equal(grounding.top_k_mask(scores, k), expected)


def test_word_metrics_separate_finding_objects_from_telling_them_apart():
    on_object = np.zeros((3, 8), bool)
    on_object[:, [1, 5]] = True  # two one-patch shapes
    on_target = np.zeros((3, 8), bool)
    on_target[:, 5] = True  # the word names the second one
    similarity = np.zeros((3, 8))
    similarity[0, 5] = 1  # right shape
    similarity[1, 1] = 1  # a shape, the wrong one
    similarity[2, 7] = 1  # background
    out = grounding.word_metrics(similarity, np.ones(3, bool), on_target, on_object)
    np.testing.assert_array_equal(out["hit"], [1, 0, 0])
    np.testing.assert_array_equal(out["object_hit"], [1, 1, 0])
    assert grounding.nanmean(out["hit_given_object"]) == 0.5
    np.testing.assert_allclose(out["random_hit"], 1 / 8)
    np.testing.assert_allclose(out["random_hit_given_object"], 0.5)
    masked = grounding.word_metrics(similarity, np.array([1, 0, 0], bool), on_target, on_object)
    np.testing.assert_array_equal(masked["hit"], [1])


def test_patch_coverage_of_a_hand_drawn_mask():
    mask = np.zeros((1, 16, 16), np.float32)
    mask[0, 0:8, 8:16] = 1.0  # the top-right patch of a 2x2 grid, whole
    mask[0, 8:12, 0:8] = 1.0  # half of the bottom-left patch
    np.testing.assert_allclose(shapes.patch_coverage(mask, 8), [[0.0, 1.0, 0.5, 0.0]])
    with pytest.raises(ValueError, match="not divisible"):
        shapes.patch_coverage(mask, 5)


def test_object_masks_match_the_rendered_pixels():
    for index in range(20):
        scene = shapes.make_example(0, "train", index, 0.25).scene
        image = np.asarray(shapes.render(scene, 64)).astype(np.int32)
        masks = shapes.object_masks(scene, 64)
        assert masks.shape == (len(scene.shapes), 64, 64)
        for shape, mask in zip(scene.shapes, masks, strict=True):
            full = mask == 1.0
            assert full.sum() > 10
            np.testing.assert_array_equal(
                image[full], np.broadcast_to(shapes.COLOURS[shape.colour], image[full].shape)
            )
        empty = masks.sum(0) == 0
        np.testing.assert_array_equal(
            image[empty], np.broadcast_to(scene.background, image[empty].shape)
        )


def test_auroc_between_two_kinds_of_patches_ignores_the_rest():
    scores = np.array([[0.9, 0.1, 0.5, 0.8, 0.2]])
    described = np.array([[1, 0, 0, 0, 0]], bool)
    distractor = np.array([[0, 0, 0, 1, 1]], bool)
    # 0.9 beats both distractors (0.8, 0.2); background patches 1 and 2 do not count.
    assert grounding.per_image_auroc_between(scores, described, distractor)[0] == 1.0
    assert grounding.per_image_auroc_between(-scores, described, distractor)[0] == 0.0
    assert np.isnan(grounding.per_image_auroc_between(scores, described, ~distractor & False)[0])
