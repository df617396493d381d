"""What the mechanism evaluator measures against: for each ``sycoca_shapes`` test record, the
generated scene's described objects (and distractors, on ``clutter`` builds) per patch, and where
the caption names each object's colour and kind.

The records' id gives back the generated scene (``shapes_builder.regenerate``), from which each
described shape's share of every patch is rendered (``shapes.object_masks``); the caption is the
record's first one, which names every described shape by size, colour and kind.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from sycoca_jax.data import clutter, pipeline, shapes, shapes_builder, sources, transforms
from sycoca_jax.data.tokenizer import Tokenizer, load_tokenizer
from sycoca_jax.evaluation.settings import EvalSettings

MAX_OBJECTS = 3  # described shapes per scene (shapes.sample_scene draws 1 to 3)
# What ``ObjectTargets`` adds to a batch, gathered whole to every process with the scores.
TARGETS = (
    "mask",
    "tokens",
    "coverage",
    "distractor_coverage",
    "colour_tokens",
    "kind_tokens",
    "same_colour",
    "same_kind",
)


def word_tokens(tokenizer: Tokenizer, caption: str, max_text_len: int) -> tuple[np.ndarray, list]:
    """``tokenizer.tokenize(caption)`` and, per word of ``caption.split()``, the positions of its
    pieces in the tokens (words cut off by ``max_text_len`` get fewer or none)."""
    ids, spans = [], []
    for word in caption.split():
        pieces = tokenizer.encode(word)
        spans.append([1 + len(ids) + i for i in range(len(pieces))])  # +1: bos
        ids.extend(pieces)
    if ids != tokenizer.encode(caption):
        raise ValueError(f"tokenizer {tokenizer.name} does not split {caption!r} at spaces")
    tokens = tokenizer.tokenize_ids(ids, max_text_len)
    last = min(len(ids), max_text_len - 1)  # pieces kept after truncation
    return tokens, [[p for p in span if p <= last] for span in spans]


class ObjectTargets(transforms.RecordMap):
    """A ``sycoca_shapes`` record -> its first caption's ``tokens``, each described shape's
    patch ``coverage`` (MAX_OBJECTS, N), and per shape the token positions of its colour and
    kind words (``colour_tokens``/``kind_tokens`` (MAX_OBJECTS, L) bool) with which shapes share
    that colour/kind (``same_colour``/``same_kind`` (MAX_OBJECTS, MAX_OBJECTS))."""

    def __init__(
        self,
        dataset: str,
        spec: sources.DatasetSpec,
        tokenizer: Tokenizer,
        max_text_len: int,
        image_size: int,
        patch_size: int,
    ):
        self.config = shapes_builder.config_from_name(dataset)
        self.spec, self.tokenizer, self.max_text_len = spec, tokenizer, max_text_len
        self.image_size, self.patch_size = image_size, patch_size

    def apply(self, record: transforms.Record) -> transforms.Record:
        split, index = shapes_builder.parse_id(record["id"])
        example = shapes_builder.regenerate(self.config, split, index)
        caption = self.spec.captions(record)[0]
        if caption != example.captions[0]:
            raise ValueError(
                f"sycoca_shapes/{self.config.name} record {split}_{index}: its caption "
                f"{caption!r} is not what the generator makes ({example.captions[0]!r}); the "
                "data was built by other generator code: delete the build and regenerate it"
            )
        scene = example.scene
        tokens, spans = word_tokens(self.tokenizer, caption, self.max_text_len)
        words = caption.split()
        n = (self.image_size // self.patch_size) ** 2
        coverage = np.zeros((MAX_OBJECTS, n), np.float32)
        masks = shapes.object_masks(scene, self.image_size)
        coverage[: len(scene.shapes)] = shapes.patch_coverage(masks, self.patch_size)
        colour_tokens = np.zeros((MAX_OBJECTS, self.max_text_len), bool)
        kind_tokens = np.zeros((MAX_OBJECTS, self.max_text_len), bool)
        same_colour = np.zeros((MAX_OBJECTS, MAX_OBJECTS), bool)
        same_kind = np.zeros((MAX_OBJECTS, MAX_OBJECTS), bool)
        for i, shape in enumerate(scene.shapes):
            at = _phrase_start(words, [shape.size, shape.colour, shape.kind])
            colour_tokens[i, spans[at + 1]] = True
            kind_tokens[i, spans[at + 2]] = True
            for j, other in enumerate(scene.shapes):
                same_colour[i, j] = other.colour == shape.colour
                same_kind[i, j] = other.kind == shape.kind
        distractors = np.zeros((n,), np.float32)
        if example.clutter is not None and example.clutter.distractors:
            masks = clutter.distractor_masks(example.clutter, self.image_size)
            distractors = shapes.patch_coverage(masks, self.patch_size).max(0)
        return {
            **record,
            "tokens": tokens,
            "coverage": coverage,
            "distractor_coverage": distractors,
            "colour_tokens": colour_tokens,
            "kind_tokens": kind_tokens,
            "same_colour": same_colour,
            "same_kind": same_kind,
        }


def _phrase_start(words: list[str], phrase: list[str]) -> int:
    for start in range(len(words) - len(phrase) + 1):
        if words[start : start + len(phrase)] == phrase:
            return start
    raise ValueError(f"caption {' '.join(words)!r} does not name {' '.join(phrase)!r}")


def object_batches(
    config: Any, settings: EvalSettings, image_size: int, patch_size: int, max_text_len: int
):
    """Host batches of ``settings.dataset``/``split``: uint8 images with ``ObjectTargets``'
    fields, ``mask`` and ``index`` (every process gets the same number of batches)."""
    data = config.data
    source = sources.open_source(
        settings.dataset, settings.split, data.data_dir, image_decoder=data.image_decoder
    )
    spec = sources.dataset_spec(settings.dataset)
    tokenizer = load_tokenizer(data.tokenizer, data.name)
    placeholder = _placeholder(image_size, (image_size // patch_size) ** 2, max_text_len)
    steps = [
        transforms.EvalImage(spec, image_size, data.min_image_size),
        ObjectTargets(settings.dataset, spec, tokenizer, max_text_len, image_size, patch_size),
        transforms.SelectKeys(tuple(placeholder)),
    ]
    index, count = pipeline.process_slice()
    batch_size = pipeline.per_process_batch_size(settings.batch_size, count)
    return pipeline.padded_eval_batches(source, steps, placeholder, index, count, batch_size)


def _placeholder(image_size: int, n: int, length: int) -> dict[str, np.ndarray]:
    return {
        "image": np.zeros((image_size, image_size, 3), np.uint8),
        "tokens": np.zeros((length + 1,), np.int32),
        "coverage": np.zeros((MAX_OBJECTS, n), np.float32),
        "distractor_coverage": np.zeros((n,), np.float32),
        "colour_tokens": np.zeros((MAX_OBJECTS, length), bool),
        "kind_tokens": np.zeros((MAX_OBJECTS, length), bool),
        "same_colour": np.zeros((MAX_OBJECTS, MAX_OBJECTS), bool),
        "same_kind": np.zeros((MAX_OBJECTS, MAX_OBJECTS), bool),
    }
