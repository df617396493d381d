"""Per-record preprocessing as grain transforms (numpy + PIL, no TensorFlow).

Records flow as dicts: the raw TFDS record, with each transform adding its outputs (``image``
replaces the encoded image, ``tokens``, ``label``, ...) and ``SelectKeys`` keeping only the
outputs at the end. A transform raises ``BadRecord(reason)`` on a record it cannot use; the base
classes turn it into a ``SkippedRecord`` that later transforms pass through untouched, so the
pipeline decides once what to do with it (replace and count when training, mask when evaluating).

Task-specific steps are small transforms of this kind in their own modules (``vqa_transforms``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from sycoca_jax.data import images
from sycoca_jax.data.skipping import BadRecord, SkippedRecord
from sycoca_jax.data.sources import DatasetSpec
from sycoca_jax.data.tokenizer import Tokenizer

Record = dict[str, Any]


# ---------------------------------------------------------------------------------------------
# Plain functions (tested on their own); decoding and cropping live in ``images``.


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
        image = images.open_image(record[self.spec.image_key], self.min_image_size)
        box = images.random_resized_crop_box(*image.size, rng, self.crop_scale)
        pixels = images.crop_and_resize(image, box, self.image_size)
        return {**record, "image": pixels}


class EvalImage(RecordMap):
    """Decode, resize the shorter side to ``image_size`` and centre crop; uint8 pixels."""

    def __init__(self, spec: DatasetSpec, image_size: int, min_image_size: int = 1):
        self.spec, self.image_size, self.min_image_size = spec, image_size, min_image_size

    def apply(self, record: Record) -> Record:
        image = images.open_image(record[self.spec.image_key], self.min_image_size)
        pixels = images.crop_and_resize(image, images.centre_crop_box(*image.size), self.image_size)
        return {**record, "image": pixels}


class SampleCaption(RecordRandomMap):
    """One non-empty caption, drawn anew for every epoch (the stream seeds the rng with the
    record and the epoch)."""

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
