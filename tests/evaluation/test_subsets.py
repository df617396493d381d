"""Metrics on the compositional test scenes and on the rest, with planted predictions.

The predict functions here are plain NumPy, not a SyCoCa: they recognise each test image (by its
pixels) and answer right exactly on the compositional scenes, read straight from the dataset's
records. So every subset metric is known in advance, and the evaluators are shown to work with
any model's predict functions.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from sycoca_jax import sharding
from sycoca_jax.data import pipeline, sources
from sycoca_jax.data.tokenizer import BOS_ID, load_tokenizer
from sycoca_jax.evaluation import (
    caption_metrics,
    captioning,
    common,
    predict,
    prompts,
    retrieval,
    zeroshot,
)
from tests.helpers import SMALL_NAME, tiny_config

EMBED = 64


@pytest.fixture(scope="module")
def split(data_dir):
    """The test split read directly: compositional flags, labels, captions; and each image's
    index by its preprocessed pixels."""
    config = tiny_config(data_dir)
    records = sources.open_source(config.data.name, "test", data_dir)
    spec = sources.dataset_spec(config.data.name)
    compositional = np.array([bool(r["compositional"]) for r in records])
    assert 0 < compositional.sum() < len(records)  # both parts exist
    index_of = {}
    batches = pipeline.make_eval_dataset(config, "classification", split="test", batch_size=8)
    for batch in batches:
        for row in np.flatnonzero(batch["mask"]):
            index_of[batch["image"][row].tobytes()] = int(batch["index"][row])
    assert len(index_of) == len(records)
    return dict(
        config=config,
        compositional=compositional,
        labels=np.array([spec.label(r) for r in records]),
        captions=[[c for c in spec.captions(r) if c.strip()] for r in records],
        index_of=index_of,
        tokenizer=load_tokenizer(None, config.data.name),
    )


def image_indices(split, images) -> list[int]:
    """Each image's index in the split (-1 for padding rows)."""
    return [split["index_of"].get(image.tobytes(), -1) for image in np.asarray(images)]


def context(split, predictors: predict.Predictors) -> common.EvalContext:
    placement = sharding.Placement.from_config(split["config"].mesh)
    return common.EvalContext(predictors, None, split["config"], placement)


def settings(cls, **fields):
    return cls(dataset=SMALL_NAME, split="test", batch_size=16, **fields)


def test_zeroshot_subsets(split):
    names = zeroshot.class_names(SMALL_NAME, split["config"].data.data_dir)
    max_len = split["config"].model.max_text_len
    prompt_class = {
        row.tobytes(): k
        for k, name in enumerate(names)
        for row in split["tokenizer"].tokenize_batch(prompts.prompts(name, prompts.SHAPES), max_len)
    }

    def encode_texts(params, tokens):
        out = np.zeros((tokens.shape[0], len(names)), np.float32)
        for r, row in enumerate(np.asarray(tokens)):
            if row.tobytes() in prompt_class:
                out[r, prompt_class[row.tobytes()]] = 1.0
        return out

    def encode_images(params, images):
        # The true class scores +1 on compositional scenes (top-1), -1 elsewhere (outside top-5).
        out = np.zeros((images.shape[0], len(names)), np.float32)
        for r, i in enumerate(image_indices(split, images)):
            if i >= 0:
                out[r, split["labels"][i]] = 1.0 if split["compositional"][i] else -1.0
        return out

    predictors = predict.Predictors(encode_images=encode_images, encode_texts=encode_texts)
    result = zeroshot.run(
        context(split, predictors), settings(zeroshot.Settings, templates="shapes")
    )
    flags = split["compositional"]
    assert result["top1"] == pytest.approx(flags.mean())
    assert result["compositional/top1"] == result["compositional/top5"] == 1.0
    assert result["seen/top1"] == result["seen/top5"] == 0.0
    assert result["compositional/num_examples"] == flags.sum()
    assert result["seen/num_examples"] == (~flags).sum()


def _text_vector(row: np.ndarray) -> np.ndarray:
    """A fixed random unit vector per caption's tokens."""
    v = np.random.default_rng(zlib.crc32(row.tobytes())).normal(size=EMBED)
    return (v / np.linalg.norm(v)).astype(np.float32)


def test_retrieval_subsets_against_brute_force(split):
    max_len = split["config"].model.max_text_len
    tokens = [split["tokenizer"].tokenize_batch(c, max_len) for c in split["captions"]]
    texts = [np.stack([_text_vector(row) for row in rows]) for rows in tokens]
    # An image is its captions' mean: first in its own captions' ranking on compositional
    # scenes; negated elsewhere, so it ranks them last.
    sign = np.where(split["compositional"], 1.0, -1.0)
    image_vectors = np.stack([s * t.mean(0) for s, t in zip(sign, texts, strict=True)])

    def encode_images(params, images):
        out = np.zeros((images.shape[0], EMBED), np.float32)
        for r, i in enumerate(image_indices(split, images)):
            if i >= 0:
                out[r] = image_vectors[i]
        return out

    def encode_texts(params, token_rows):
        return np.stack([_text_vector(row) for row in np.asarray(token_rows)])

    predictors = predict.Predictors(encode_images=encode_images, encode_texts=encode_texts)
    result = retrieval.run(context(split, predictors), settings(retrieval.Settings))

    owners = np.concatenate([[i] * len(t) for i, t in enumerate(texts)])
    sim = image_vectors @ np.concatenate(texts).T
    i2t = np.array([np.sum(sim[i] > sim[i, owners == i].max()) for i in range(len(sim))])
    t2i = np.array([np.sum(sim[:, t] > sim[owners[t], t]) for t in range(sim.shape[1])])
    for subset, rows in (
        ("compositional", split["compositional"]),
        ("seen", ~split["compositional"]),
    ):
        expected = retrieval.recall_metrics(i2t[rows], t2i[rows[owners]])
        for key, value in expected.items():
            assert result[f"{subset}/{key}"] == pytest.approx(value), (subset, key)
        assert result[f"{subset}/num_images"] == rows.sum()
    assert result["compositional/image_to_text_r1"] == 1.0
    assert result["seen/image_to_text_r10"] == 0.0
    assert result["mean_recall"] == pytest.approx(retrieval.recall_metrics(i2t, t2i)["mean_recall"])


def test_captioning_subsets(split):
    tokenizer = split["tokenizer"]

    def caption(params, images, rng, decode_settings):
        # A reference on compositional scenes, "a" elsewhere.
        max_len = dict(decode_settings)["max_len"]
        out = np.zeros((images.shape[0], max_len + 1), np.int32)
        out[:, 0] = BOS_ID
        for r, i in enumerate(image_indices(split, images)):
            if i >= 0:
                text = split["captions"][i][0] if split["compositional"][i] else "a"
                out[r] = tokenizer.tokenize(text, max_len)
        return out

    result = captioning.run(
        context(split, predict.Predictors(caption=caption)),
        settings(
            captioning.Settings,
            decode="greedy",
            metrics=("bleu", "cider"),
            tokenizer="python",
            print_examples=0,
        ),
    )
    flags, max_len = split["compositional"], split["config"].model.max_text_len
    predictions = [
        tokenizer.decode(tokenizer.tokenize(c[0] if f else "a", max_len))
        for c, f in zip(split["captions"], flags, strict=True)
    ]
    for subset, rows in (("compositional", flags), ("seen", ~flags)):
        expected = caption_metrics.score_captions(
            [p for p, keep in zip(predictions, rows, strict=True) if keep],
            [c for c, keep in zip(split["captions"], rows, strict=True) if keep],
            metrics=("bleu", "cider"),
            tokenizer="python",
        )
        for key in ("bleu_1", "bleu_4", "cider", "num_images"):
            assert result[f"{subset}/{key}"] == pytest.approx(expected[key]), (subset, key)
    assert result["compositional/bleu_1"] == pytest.approx(1.0)
    assert result["seen/bleu_4"] < 0.01
