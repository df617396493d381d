"""Per-record preprocessing as grain transforms (numpy + PIL, no TensorFlow).

Records flow as dicts: the raw TFDS record, with each transform adding its outputs (``image``
replaces the encoded image, ``tokens``, ``label``, ...) and ``SelectKeys`` keeping only the
outputs at the end. A transform raises ``BadRecord(reason)`` on a record it cannot use; the base
classes turn it into a ``SkippedRecord`` that later transforms pass through untouched, so the
pipeline decides once what to do with it (drop and count when training, mask when evaluating).

New tasks (e.g. VQA question/answer tokens) are one more small transform of this kind.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np
from PIL import Image

from sycoca_jax.data import vqa_answers
from sycoca_jax.data.skipping import BadRecord, SkippedRecord
from sycoca_jax.data.sources import DatasetSpec
from sycoca_jax.data.tokenizer import Tokenizer

DEFAULT_CROP_RATIO = (3 / 4, 4 / 3)

Record = dict[str, Any]


# ---------------------------------------------------------------------------------------------
# Image helpers (plain functions, tested on their own).


def open_image(data: bytes | np.ndarray, min_image_size: int = 1) -> Image.Image:
    """Opens encoded bytes (header only: decoding waits for the crop) or a decoded array.

    Raises ``BadRecord`` for bytes PIL cannot identify and for images smaller than
    ``min_image_size`` on their short side.
    """
    if isinstance(data, np.ndarray):
        array = data[..., 0] if data.ndim == 3 and data.shape[-1] == 1 else data
        image = Image.fromarray(np.ascontiguousarray(array))
    else:
        try:
            image = Image.open(io.BytesIO(bytes(data)))
        except Exception as e:  # PIL raises several types for unreadable data
            raise BadRecord("undecodable_image", str(e)) from e
    if min(image.size) < min_image_size:
        raise BadRecord("image_too_small", f"{image.size} < {min_image_size}")
    return image


def random_resized_crop_box(
    width: int,
    height: int,
    rng: np.random.Generator,
    scale: tuple[float, float],
    ratio: tuple[float, float] = DEFAULT_CROP_RATIO,
) -> tuple[int, int, int, int]:
    """Inception-style crop ``(left, top, right, bottom)``: area fraction in ``scale``, aspect
    ratio (log-uniform) in ``ratio``; falls back to the largest centred crop within ``ratio``."""
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    if scale[0] < 1.0:
        for _ in range(10):
            target = area * rng.uniform(scale[0], scale[1])
            aspect = math.exp(rng.uniform(log_lo, log_hi))
            w = int(round(math.sqrt(target * aspect)))
            h = int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                left = int(rng.integers(0, width - w + 1))
                top = int(rng.integers(0, height - h + 1))
                return left, top, left + w, top + h
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif aspect > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def centre_crop_box(width: int, height: int) -> tuple[int, int, int, int]:
    """The centred square of side ``min(width, height)``: resize-shorter-side + centre crop."""
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def crop_and_resize(image: Image.Image, box: tuple[int, int, int, int], size: int) -> np.ndarray:
    """Decodes ``image`` (JPEGs at a reduced scale when the crop is at least twice ``size``),
    crops ``box`` and resizes it (bicubic) to ``size`` x ``size``; uint8 RGB.

    Raises ``BadRecord`` when the pixel data cannot be decoded (e.g. a truncated file).
    """
    left, top, right, bottom = box
    try:
        if image.format == "JPEG":
            full_w, full_h = image.size
            need_w = math.ceil(full_w * size / max(right - left, 1))
            need_h = math.ceil(full_h * size / max(bottom - top, 1))
            if need_w * 2 <= full_w and need_h * 2 <= full_h:
                image.draft("RGB", (need_w, need_h))
                fx, fy = image.size[0] / full_w, image.size[1] / full_h
                left, right, top, bottom = left * fx, right * fx, top * fy, bottom * fy
        if image.mode == "P":  # palette images may carry transparency
            image = image.convert("RGBA")
        if image.mode != "RGB":
            image = image.convert("RGB")
        resized = image.resize(
            (size, size), Image.Resampling.BICUBIC, box=(left, top, right, bottom)
        )
    except Exception as e:  # truncated or corrupt pixel data
        raise BadRecord("undecodable_image", str(e)) from e
    return np.asarray(resized, dtype=np.uint8)


def non_empty(captions: Sequence[str]) -> list[str]:
    return [c for c in captions if c.strip()]


# ---------------------------------------------------------------------------------------------
# Grain transforms.


class RecordMap(grain.transforms.Map):
    """Base: ``apply(record)`` on good records; ``BadRecord`` -> ``SkippedRecord``."""

    def map(self, element: Record | SkippedRecord) -> Record | SkippedRecord:
        if isinstance(element, SkippedRecord):
            return element
        try:
            return self.apply(element)
        except BadRecord as e:
            return SkippedRecord(e.reason)

    def apply(self, record: Record) -> Record:
        raise NotImplementedError


class RecordRandomMap(grain.transforms.RandomMap):
    """Base: ``apply(record, rng)`` on good records; ``BadRecord`` -> ``SkippedRecord``."""

    def random_map(
        self, element: Record | SkippedRecord, rng: np.random.Generator
    ) -> Record | SkippedRecord:
        if isinstance(element, SkippedRecord):
            return element
        try:
            return self.apply(element, rng)
        except BadRecord as e:
            return SkippedRecord(e.reason)

    def apply(self, record: Record, rng: np.random.Generator) -> Record:
        raise NotImplementedError


class TrainImage(RecordRandomMap):
    """Decode, random-resized-crop, resize to ``image_size``; uint8 pixels (the model normalises
    them on device: ``sycoca_jax.models.pixels``)."""

    def __init__(
        self,
        spec: DatasetSpec,
        image_size: int,
        crop_scale: tuple[float, float],
        min_image_size: int = 1,
    ):
        lo, hi = (float(s) for s in crop_scale)
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < min <= max <= 1, got {crop_scale}")
        self.spec, self.image_size, self.crop_scale = spec, image_size, (lo, hi)
        self.min_image_size = min_image_size

    def apply(self, record: Record, rng: np.random.Generator) -> Record:
        image = open_image(record[self.spec.image_key], self.min_image_size)
        box = random_resized_crop_box(*image.size, rng, self.crop_scale)
        pixels = crop_and_resize(image, box, self.image_size)
        return {**record, "image": pixels}


class EvalImage(RecordMap):
    """Decode, resize the shorter side to ``image_size`` and centre crop; uint8 pixels."""

    def __init__(self, spec: DatasetSpec, image_size: int, min_image_size: int = 1):
        self.spec, self.image_size, self.min_image_size = spec, image_size, min_image_size

    def apply(self, record: Record) -> Record:
        image = open_image(record[self.spec.image_key], self.min_image_size)
        pixels = crop_and_resize(image, centre_crop_box(*image.size), self.image_size)
        return {**record, "image": pixels}


class SampleCaption(RecordRandomMap):
    """One non-empty caption, drawn anew for every epoch (the rng is per index and epoch)."""

    def __init__(self, spec: DatasetSpec):
        self.spec = spec

    def apply(self, record: Record, rng: np.random.Generator) -> Record:
        captions = non_empty(self.spec.captions(record))
        if not captions:
            raise BadRecord("empty_caption")
        return {**record, "caption": captions[int(rng.integers(len(captions)))]}


class FirstCaption(RecordMap):
    """The first non-empty caption (deterministic; for validation losses)."""

    def __init__(self, spec: DatasetSpec):
        self.spec = spec

    def apply(self, record: Record) -> Record:
        captions = non_empty(self.spec.captions(record))
        if not captions:
            raise BadRecord("empty_caption")
        return {**record, "caption": captions[0]}


class TokenizeCaption(RecordMap):
    """``caption`` -> ``tokens`` int32 ``(max_text_len + 1,)``."""

    def __init__(self, tokenizer: Tokenizer, max_text_len: int):
        self.tokenizer, self.max_text_len = tokenizer, max_text_len

    def apply(self, record: Record) -> Record:
        return {**record, "tokens": self.tokenizer.tokenize(record["caption"], self.max_text_len)}


class TokenizeAllCaptions(RecordMap):
    """The first ``num_captions`` non-empty captions -> ``tokens`` ``(C, max_text_len + 1)`` and
    ``caption_mask`` ``(C,)`` (False for rows of pad when an image has fewer captions)."""

    def __init__(
        self, spec: DatasetSpec, tokenizer: Tokenizer, max_text_len: int, num_captions: int
    ):
        self.spec, self.tokenizer = spec, tokenizer
        self.max_text_len, self.num_captions = max_text_len, num_captions

    def apply(self, record: Record) -> Record:
        captions = non_empty(self.spec.captions(record))[: self.num_captions]
        if not captions:
            raise BadRecord("empty_caption")
        tokens = np.zeros((self.num_captions, self.max_text_len + 1), np.int32)
        tokens[: len(captions)] = self.tokenizer.tokenize_batch(captions, self.max_text_len)
        mask = np.arange(self.num_captions) < len(captions)
        return {**record, "tokens": tokens, "caption_mask": mask}


class CaptionTexts(RecordMap):
    """The first ``num_captions`` non-empty captions as text (object array ``(C,)``, "" where an
    image has fewer) and ``caption_mask``: references for captioning metrics (host side only)."""

    def __init__(self, spec: DatasetSpec, num_captions: int):
        self.spec, self.num_captions = spec, num_captions

    def apply(self, record: Record) -> Record:
        captions = non_empty(self.spec.captions(record))[: self.num_captions]
        if not captions:
            raise BadRecord("empty_caption")
        texts = np.full((self.num_captions,), "", dtype=object)
        texts[: len(captions)] = captions
        mask = np.arange(self.num_captions) < len(captions)
        return {**record, "captions": texts, "caption_mask": mask}


class Label(RecordMap):
    """The class label as int32."""

    def __init__(self, spec: DatasetSpec):
        self.spec = spec

    def apply(self, record: Record) -> Record:
        return {**record, "label": np.int32(self.spec.label(record))}


class SelectKeys(grain.transforms.Map):
    """Keeps the model inputs; skipped records pass through."""

    def __init__(self, keys: Sequence[str]):
        self.keys = tuple(keys)

    def map(self, element: Record | SkippedRecord) -> Record | SkippedRecord:
        if isinstance(element, SkippedRecord):
            return element
        return {k: element[k] for k in self.keys}


class MaskSkipped(grain.transforms.Map):
    """Evaluation: a good record gets ``mask=True``; a skipped one becomes ``placeholder``
    (zeros, ``mask=False``) so batches keep their shape and metrics can ignore it."""

    def __init__(self, placeholder: Record):
        self.placeholder = {**placeholder, "mask": np.bool_(False)}

    def map(self, element: Record | SkippedRecord) -> Record:
        if isinstance(element, SkippedRecord):
            return dict(self.placeholder)
        return {**element, "mask": np.bool_(True)}


class SplitIndex(grain.transforms.MapWithIndex):
    """Evaluation: ``index``, the record's position in the whole split (a process reads the
    records ``process_index::process_count``), so results gathered from every process can be put
    back in dataset order whatever the device layout."""

    def __init__(self, process_index: int, process_count: int):
        self.process_index, self.process_count = process_index, process_count

    def map_with_index(self, index: int, element: Record) -> Record:
        return {**element, "index": np.int32(self.process_index + self.process_count * index)}


class VQAQuestions(RecordMap):
    """A VQA record's first ``max_questions`` questions -> ``tokens`` ``(Q, max_text_len + 1)``,
    ``question_mask`` ``(Q,)`` (False for rows of pad when an image has fewer questions), and per
    question its distinct human answers as ``answer_ids`` ``(Q, A)`` (answer-vocabulary index, -1
    outside it or padding) with their accuracies ``answer_scores`` ``(Q, A)``
    (``vqa_answers.answer_scores``). With ``qa_tokens``, also ``qa_tokens`` ``(Q, L + 1)``: each
    question followed by its best answer, for co-training the captioning loss.

    A record without questions is bad (counted as ``empty_caption``: it has no text to train on).
    """

    def __init__(
        self,
        spec: DatasetSpec,
        tokenizer: Tokenizer,
        max_text_len: int,
        max_questions: int,
        vocab_index: dict[str, int],
        max_answers: int,
        accuracy: str = "vqav2",
        qa_tokens: bool = False,
    ):
        self.spec, self.tokenizer, self.max_text_len = spec, tokenizer, max_text_len
        self.max_questions, self.max_answers = max_questions, max_answers
        self.vocab_index, self.accuracy, self.qa_tokens = dict(vocab_index), accuracy, qa_tokens

    def apply(self, record: Record) -> Record:
        pairs = [(q, a) for q, a in self.spec.questions_and_answers(record) if q.strip()]
        pairs = pairs[: self.max_questions]
        if not pairs:
            raise BadRecord("empty_caption", "no question")
        q, a, length = self.max_questions, self.max_answers, self.max_text_len + 1
        out = {
            "tokens": np.zeros((q, length), np.int32),
            "question_mask": np.arange(q) < len(pairs),
            "answer_ids": np.full((q, a), -1, np.int32),
            "answer_scores": np.zeros((q, a), np.float32),
        }
        if self.qa_tokens:
            out["qa_tokens"] = np.zeros((q, length), np.int32)
        for i, (question, answers) in enumerate(pairs):
            out["tokens"][i] = self.tokenizer.tokenize(question, self.max_text_len)
            ids, scores, best = vqa_answers.answer_targets(
                answers, self.vocab_index, a, self.accuracy
            )
            out["answer_ids"][i], out["answer_scores"][i] = ids, scores
            if self.qa_tokens:
                text = f"{question} {best}".strip()
                out["qa_tokens"][i] = self.tokenizer.tokenize(text, self.max_text_len)
        return {**record, **out}
