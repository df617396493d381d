"""Where datasets live and how their records are read: TFDS ArrayRecord data sources, no
TensorFlow.

Every dataset is opened from its prepared files (``builder_from_files``), never through the
registered TFDS builder class: those classes import TensorFlow. ``sycoca_shapes`` is the exception:
its builder is ours, needs no TensorFlow, and generates the data on first use.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import read_only_builder

from sycoca_jax.data import shapes_builder

DATA_DIR_ENV = "SYCOCA_DATA_DIR"
IMAGE_DECODERS = ("pil", "tfds")


def resolve_data_dir(data_dir: str | None = None) -> str:
    """``data_dir`` if given, else ``$SYCOCA_DATA_DIR``, else ``~/tensorflow_datasets``."""
    if data_dir:
        return os.fspath(data_dir)
    return os.environ.get(DATA_DIR_ENV) or os.path.expanduser("~/tensorflow_datasets")


def base_name(name: str) -> str:
    """``"coco_captions/2014:1.1.0"`` -> ``"coco_captions"``."""
    return name.split("/")[0].split(":")[0]


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """Which features of a dataset's records hold the image, the captions and the label."""

    image_key: str = "image"
    caption_key: str | None = "captions"  # a sequence of texts, or of dicts (see caption_subkey)
    caption_subkey: str | None = None  # coco_captions: captions are {"text": ..., "id": ...}
    label_key: str | None = None
    num_captions: int = 1  # captions per image in retrieval batches
    extra_text_keys: tuple[str, ...] = ()  # more text a tokenizer should cover (e.g. VQA)
    # VQA (read only by the VQA transfer pipeline): the record's questions, and their human
    # answers: one text per question, or (the VQA converter's layout) every question's answers
    # flattened, with the number per question under ``answer_count_key``.
    question_key: str | None = "questions"
    answer_key: str | None = "answers"
    answer_count_key: str | None = "answer_counts"

    def captions(self, record: dict[str, Any]) -> list[str]:
        """All captions of ``record`` as str (TFDS returns bytes), empty ones included."""
        if self.caption_key is None:
            raise ValueError("this dataset has no captions")
        value = record[self.caption_key]
        if self.caption_subkey is not None:
            value = value[self.caption_subkey]
        return [_to_str(v) for v in _as_list(value)]

    def label(self, record: dict[str, Any]) -> int:
        if self.label_key is None:
            raise ValueError("this dataset has no class label")
        return int(record[self.label_key])

    def questions_and_answers(self, record: dict[str, Any]) -> list[tuple[str, list[str]]]:
        """``[(question, [human answers...]), ...]`` of a VQA record, as str."""
        missing = [k for k in (self.question_key, self.answer_key) if k is None or k not in record]
        if missing:
            raise ValueError(
                f"records of this dataset have no VQA field(s) {missing} (fields: "
                f"{sorted(record)}); VQA data needs questions and answers, e.g. from "
                "`python -m sycoca_jax.data.prepare vqa ...`"
            )
        questions = [_to_str(q) for q in _as_list(record[self.question_key])]
        answers = [_to_str(a) for a in _as_list(record[self.answer_key])]
        if self.answer_count_key is None or self.answer_count_key not in record:
            counts = [1] * len(questions)
        else:
            counts = [int(c) for c in _as_list(record[self.answer_count_key])]
        if len(counts) != len(questions) or sum(counts) != len(answers):
            raise ValueError(
                f"a VQA record has {len(questions)} questions, {len(answers)} answers and answer "
                f"counts {counts}: they do not line up"
            )
        ends = np.cumsum(counts)
        return [
            (q, answers[end - n : end]) for q, n, end in zip(questions, counts, ends, strict=True)
        ]

    def texts(self, record: dict[str, Any]) -> list[str]:
        """Every text of the record a tokenizer should know: captions and extra text fields."""
        texts = self.captions(record) if self.caption_key else []
        for key in self.extra_text_keys:
            texts.extend(_to_str(v) for v in _as_list(record[key]))
        return texts


def _as_list(value: Any) -> list[Any]:
    if isinstance(value, (str, bytes)):
        return [value]
    return list(value)


def _to_str(value: Any) -> str:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


# Datasets with a layout other than the converter's (image + captions). Anything else is read
# with the converter's layout (see sycoca_jax.data.prepare).
KNOWN_SPECS = {
    "sycoca_shapes": DatasetSpec(
        label_key="label", num_captions=5, extra_text_keys=("questions", "answers")
    ),
    "coco_captions": DatasetSpec(caption_subkey="text", num_captions=5),
    "imagenet2012": DatasetSpec(caption_key=None, label_key="label"),
    "cifar10": DatasetSpec(caption_key=None, label_key="label"),
    "cifar100": DatasetSpec(caption_key=None, label_key="label"),
}


def dataset_spec(name: str) -> DatasetSpec:
    return KNOWN_SPECS.get(base_name(name), DatasetSpec())


def load_builder(name: str, data_dir: str | None = None) -> tfds.core.DatasetBuilder:
    """The builder of a prepared dataset; ``sycoca_shapes`` is generated here if missing."""
    data_dir = resolve_data_dir(data_dir)
    if base_name(name) == "sycoca_shapes":
        return shapes_builder.prepare(shapes_builder.config_from_name(name), data_dir)
    try:
        # Looked up at call time so tfds.testing.mock_data can patch it.
        builder = read_only_builder.builder_from_files(name, data_dir=data_dir)
    except tfds.core.DatasetNotFoundError as e:
        raise FileNotFoundError(_not_found_message(name, data_dir)) from e
    return builder


def _not_found_message(name: str, data_dir: str) -> str:
    if base_name(name) in KNOWN_SPECS:
        how = (
            f"prepare it once with TensorFlow installed (pip install -e '.[prepare]'): "
            f"`tfds build {base_name(name)} --file_format=array_record --data_dir={data_dir}` "
            "(or convert an existing TFRecord copy with `tfds convert_format "
            "--out_file_format=array_record ...`)"
        )
    else:
        how = (
            "build it from local image-text data with `python -m sycoca_jax.data.prepare "
            f"local --source=... --name={base_name(name)} --data_dir={data_dir}`"
        )
    return (
        f"dataset {name!r} is not prepared in data_dir {data_dir!r} (set config.data.data_dir "
        f"or ${DATA_DIR_ENV}); {how}"
    )


def open_source(
    name: str, split: str, data_dir: str | None = None, *, image_decoder: str = "pil"
) -> Sequence[dict[str, Any]]:
    """Random-access records of ``split`` (any TFDS split string, e.g. ``"train+restval"``).

    ``image_decoder="pil"`` leaves images encoded: the pipeline decodes them itself (draft-mode
    JPEG decoding, corrupt images counted and skipped). ``"tfds"`` lets TFDS decode them.
    """
    if image_decoder not in IMAGE_DECODERS:
        raise ValueError(f"image_decoder must be one of {IMAGE_DECODERS}, got {image_decoder!r}")
    builder = load_builder(name, data_dir)
    spec = dataset_spec(name)
    splits = builder.info.splits
    known = list(splits.keys()) if hasattr(splits, "keys") else []
    if known and split.split("[")[0].split("+")[0] not in known:
        raise ValueError(f"dataset {name!r} has no split {split!r}; it has: {', '.join(known)}")
    decoders = None
    if image_decoder == "pil":
        decoders = {spec.image_key: tfds.decode.SkipDecoding()}
    try:
        return builder.as_data_source(split=split, decoders=decoders)
    except NotImplementedError as e:
        raise ValueError(
            f"dataset {name!r} in {builder.data_dir} is not stored as ArrayRecord; convert it "
            "with `tfds convert_format --out_file_format=array_record ...`"
        ) from e


def class_names(name: str, data_dir: str | None = None) -> list[str]:
    """Label names of a classification dataset (imagenet2012's are WordNet ids)."""
    spec = dataset_spec(name)
    if spec.label_key is None:
        raise ValueError(f"dataset {name!r} has no class label")
    return list(load_builder(name, data_dir).info.features[spec.label_key].names)


def dataset_texts(
    name: str, split: str = "train", data_dir: str | None = None, max_records: int | None = None
) -> list[str]:
    """The captions (and other text, see ``DatasetSpec.extra_text_keys``) of up to
    ``max_records`` records spread evenly over the split; for tokenizer training."""
    spec = dataset_spec(name)
    source = open_source(name, split, data_dir)
    n = len(source)
    count = n if max_records is None else min(n, max_records)
    indices = np.linspace(0, n - 1, count).round().astype(np.int64) if count else []
    texts: list[str] = []
    for start in range(0, len(indices), 1024):
        chunk = [int(i) for i in indices[start : start + 1024]]
        for record in source.__getitems__(chunk):
            texts.extend(spec.texts(record))
    return texts
