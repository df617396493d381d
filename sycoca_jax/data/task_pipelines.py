"""Labelled pipelines for transfer: classification and VQA batches, training and evaluation.

Training batches come from ``pipeline.augmented_batches``, the pretraining pipeline with other
per-record steps, so slicing, shuffling, skip counting and prefetching behave exactly as in
pretraining:

* ``classification_train_dataset``: ``image`` (augmented as in pretraining), ``label``;
* ``vqa_train_dataset``: ``image``, and per image its first ``max_questions`` questions:
  ``tokens`` (b, Q, L+1), ``question_mask``, ``answer_ids`` / ``answer_scores`` (b, Q, A)
  (``vqa_transforms.VQAQuestions``), optionally ``qa_tokens``;
* ``vqa_eval_dataset``: the same without augmentation, every record kept, the last batch padded
  and ``mask`` (b,) marking real images (``pipeline.eval_dataset``'s convention).

Classification evaluation is ``pipeline.eval_dataset(task="classification")``. All images of an
image's questions are encoded once: the model repeats the image tokens for its Q questions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from sycoca_jax.data import pipeline, sources, transforms, vqa_answers, vqa_transforms
from sycoca_jax.data.tokenizer import Tokenizer


def classification_train_dataset(
    source: Sequence[Any], *, spec: sources.DatasetSpec, **options: Any
) -> grain.IterDataset:
    """Training batches ``{"image": (b, H, W, 3) f32, "label": (b,) i32}``; ``options`` as in
    ``pipeline.augmented_batches``."""
    return pipeline.augmented_batches(
        source, [transforms.Label(spec)], ("label",), spec=spec, **options
    )


def _vqa_keys(qa_tokens: bool) -> tuple[str, ...]:
    keys = ("tokens", "question_mask", "answer_ids", "answer_scores")
    return keys + ("qa_tokens",) if qa_tokens else keys


def vqa_train_dataset(
    source: Sequence[Any],
    *,
    spec: sources.DatasetSpec,
    tokenizer: Tokenizer,
    vocab: vqa_answers.AnswerVocab,
    max_text_len: int,
    max_questions: int,
    max_answers: int,
    accuracy: str = "vqav2",
    qa_tokens: bool = False,
    **options: Any,
) -> grain.IterDataset:
    """Training batches of images with their questions and answer targets (module docstring);
    ``options`` as in ``pipeline.augmented_batches``."""
    step = vqa_transforms.VQAQuestions(
        spec,
        tokenizer,
        max_text_len,
        max_questions,
        vocab.index(),
        max_answers,
        accuracy,
        qa_tokens,
    )
    return pipeline.augmented_batches(source, [step], _vqa_keys(qa_tokens), spec=spec, **options)


def vqa_eval_dataset(
    source: Sequence[Any],
    *,
    spec: sources.DatasetSpec,
    tokenizer: Tokenizer,
    vocab: vqa_answers.AnswerVocab,
    image_size: int,
    max_text_len: int,
    max_questions: int,
    max_answers: int,
    global_batch_size: int,
    accuracy: str = "vqav2",
    process_index: int | None = None,
    process_count: int | None = None,
    min_image_size: int = 1,
) -> grain.MapDataset:
    """Evaluation batches (no shuffle, centre crop, padded; ``len()`` batches on every process)."""
    index, count = pipeline.process_slice(process_index, process_count)
    batch_size = pipeline.per_process_batch_size(global_batch_size, count)
    steps = [
        transforms.EvalImage(spec, image_size, min_image_size),
        vqa_transforms.VQAQuestions(
            spec, tokenizer, max_text_len, max_questions, vocab.index(), max_answers, accuracy
        ),
        transforms.SelectKeys(("image", *_vqa_keys(False))),
    ]
    placeholder = {
        "image": np.zeros((image_size, image_size, 3), np.uint8),
        "tokens": np.zeros((max_questions, max_text_len + 1), np.int32),
        "question_mask": np.zeros((max_questions,), bool),
        "answer_ids": np.full((max_questions, max_answers), -1, np.int32),
        "answer_scores": np.zeros((max_questions, max_answers), np.float32),
    }
    return pipeline.padded_eval_batches(source, steps, placeholder, index, count, batch_size)


def count_vqa_answers(
    source: Sequence[Any], spec: sources.DatasetSpec, chunk: int = 1024
) -> tuple[Any, list[Any]]:
    """Normalised answer counts of every record of ``source`` (overall and per question slot),
    for the answer vocabulary and the answer-prior baselines."""

    def records():
        for start in range(0, len(source), chunk):
            indices = list(range(start, min(start + chunk, len(source))))
            for record in source.__getitems__(indices):
                yield spec.questions_and_answers(record)

    return vqa_answers.count_answers(records())


def label_counts(
    source: Sequence[Any],
    spec: sources.DatasetSpec,
    num_classes: int,
    max_records: int | None = 50_000,
    chunk: int = 1024,
) -> np.ndarray:
    """How often each class occurs among up to ``max_records`` records spread evenly over
    ``source`` (for the majority-class baseline)."""
    n = len(source)
    count = n if max_records is None else min(n, max_records)
    indices = np.linspace(0, n - 1, count).round().astype(np.int64) if count else []
    counts = np.zeros((num_classes,), np.int64)
    for start in range(0, len(indices), chunk):
        for record in source.__getitems__([int(i) for i in indices[start : start + chunk]]):
            counts[spec.label(record)] += 1
    return counts
