"""The VQA converter: COCO-style VQA data (image path + question + human answers) -> ArrayRecord.

  python -m sycoca_jax.data.prepare vqa --source=/data/vqa/train.jsonl \\
      --source=validation=/data/vqa/val.jsonl --name=coco_vqa --data_dir=/data/tfds
  # or straight from the official VQAv2 files (QUESTIONS,ANNOTATIONS,IMAGE_FOLDER):
  python -m sycoca_jax.data.prepare vqa --name=coco_vqa --official=train=\\
      v2_OpenEnded_mscoco_train2014_questions.json,v2_mscoco_train2014_annotations.json,train2014

JSONL input: one question per line, ``{"image": <path>, "question": <text>, "answers": [<text>,
...]}`` (or ``"answer": <text>`` for a single reference); image paths are relative to the file's
folder unless absolute. Lines are grouped by image: one record per image holds ``questions``, its
questions, ``answers``, all their human answers flattened, and ``answer_counts``, how many belong
to each question (``sources.DatasetSpec.questions_and_answers`` reads this layout back).

Images are checked exactly as ``prepare local`` checks them (``converter.check_sample``: decoded
in full, ``--min_image_size``, modes converted, optional re-encoding); bad images, missing images,
unreadable lines, text that is not UTF-8 and questions without text or answers are skipped and
counted in ``conversion_summary.json``. The command line is ``sycoca_jax.data.prepare vqa``.
"""

from __future__ import annotations

import collections
import json
import os
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from sycoca_jax.data import converter, readers

QA = tuple[str, list[str]]


UNDECODABLE = "undecodable_text"  # stands for a JSONL line with bytes that are not UTF-8


def jsonl_rows(path: str) -> Iterator[dict[str, Any] | str | None]:
    """The lines of a JSONL file as dicts (None for a line that is not a JSON object,
    ``UNDECODABLE`` for one that is not UTF-8); image paths made absolute."""
    folder = os.path.dirname(os.path.abspath(path))
    with open(path, encoding="utf-8-sig", errors="surrogateescape") as f:
        for line in f:
            if not line.strip():
                continue
            if readers.has_undecodable_text(line):
                yield UNDECODABLE
                continue
            try:
                row = json.loads(line)
            except ValueError:
                yield None
                continue
            if not isinstance(row, dict) or "image" not in row:
                yield None
                continue
            yield {**row, "image": os.path.join(folder, str(row["image"]))}


def official_rows(questions: str, annotations: str, image_dir: str) -> Iterator[dict[str, Any]]:
    """Rows from the official VQAv2 files: image ``<image_dir>/COCO_<subtype>_<id:012d>.jpg``,
    the question and its (10) human answers."""
    with open(questions, encoding="utf-8") as f:
        question_file = json.load(f)
    with open(annotations, encoding="utf-8") as f:
        answers = {a["question_id"]: a for a in json.load(f)["annotations"]}
    subtype = question_file.get("data_subtype", "")
    for q in question_file["questions"]:
        annotation = answers.get(q["question_id"], {})
        yield {
            "image": os.path.join(image_dir, f"COCO_{subtype}_{int(q['image_id']):012d}.jpg"),
            "question": q["question"],
            "answers": [a["answer"] for a in annotation.get("answers", [])],
        }


def group_by_image(
    rows: Iterable[dict[str, Any] | str | None], counts: collections.Counter
) -> list[tuple[str, list[QA]]]:
    """``[(image path, [(question, answers), ...]), ...]`` in order of first appearance; bad
    lines and questions without text or answers are counted in ``counts``."""
    groups: dict[str, list[QA]] = {}
    for row in rows:
        if row is None or row == UNDECODABLE:
            counts["unreadable_row" if row is None else UNDECODABLE] += 1
            continue
        question = str(row.get("question") or "").strip()
        answers = row.get("answers", row.get("answer"))
        answers = [answers] if isinstance(answers, str) else list(answers or [])
        answers = [str(a).strip() for a in answers if str(a).strip()]
        if readers.has_undecodable_text(question, *answers):
            counts[UNDECODABLE] += 1
            continue
        if not question or not answers:
            counts["empty_question"] += 1
            continue
        groups.setdefault(str(row["image"]), []).append((question, answers))
    return list(groups.items())


def _samples(groups: list[tuple[str, list[QA]]]) -> Iterator[readers.ImageText]:
    """Each image as the converter's sample (its first question standing in for the caption)."""
    for path, qas in groups:
        try:
            with open(path, "rb") as f:
                image = f.read()
        except OSError:
            yield readers.ImageText(path, None, qas[0][0], problem="missing_image")
            continue
        yield readers.ImageText(path, image, qas[0][0])


class VQADataset(converter.ImageTextDataset, skip_registration=True):
    """Images with their questions and human answers, built from local files."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Converted with sycoca_jax.data.prepare vqa."}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Images, questions and human answers converted from local files.",
            features=tfds.features.FeaturesDict(
                {
                    "key": tfds.features.Text(),
                    "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
                    "questions": tfds.features.Sequence(tfds.features.Text()),
                    "answers": tfds.features.Sequence(tfds.features.Text()),
                    "answer_counts": tfds.features.Sequence(np.int32),
                }
            ),
        )

    def check_sources(self) -> None:
        for source in self._split_sources.values():
            for path in source if isinstance(source, tuple) else (source,):
                if not os.path.exists(path):
                    raise FileNotFoundError(f"VQA source {path!r} does not exist")

    def _generate_examples(self, split: str, source: Any):
        counter = self.split_counter(split)
        rows = official_rows(*source) if isinstance(source, tuple) else jsonl_rows(source)
        groups = group_by_image(rows, counter.counts)
        checked = converter.checked_samples(_samples(groups), self._options)
        for (path, qas), (reason, record) in zip(groups, checked, strict=True):
            if not counter.admit(path, reason):
                continue
            yield (
                path,
                {
                    "key": path,
                    "image": record["image"],
                    "questions": [q for q, _ in qas],
                    "answers": [a for _, answers in qas for a in answers],
                    "answer_counts": [len(answers) for _, answers in qas],
                },
            )
        counter.finish(split)


def convert_vqa(
    split_sources: dict[str, str | tuple[str, str, str]],
    *,
    name: str,
    data_dir: str | None = None,
    options: converter.ConversionOptions | None = None,
) -> dict:
    """Builds ``<data_dir>/<name>/1.0.0``; a source is a JSONL path or the official
    ``(questions, annotations, image folder)``. Returns (and writes) the summary."""
    return converter.convert_local(
        split_sources, name=name, data_dir=data_dir, options=options, builder_class=VQADataset
    )
