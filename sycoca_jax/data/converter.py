"""The converter: local image-caption data -> an ArrayRecord TFDS dataset (no TensorFlow).

One bad record never aborts a conversion: each is skipped and counted by reason (the readers'
``unreadable_row``, ``unreadable_shard``, ``unreadable_sidecar``, ``undecodable_text``,
``bad_caption_type``, ``missing_image``; here ``empty_caption``, ``undecodable_image``,
``image_too_small``, ``image_too_large``, ``duplicate_key``), and ``conversion_summary.json``
next to the data says ``{"written": n, "skipped": {"<reason>": n, ...}, "splits": {...}}``. A
split with no usable record still gets its summary, then ``NothingUsableError``.

Images are stored byte for byte when every decoder reads them as 8-bit RGB or grey; any other
mode (16-bit, CMYK, palette, transparency) is converted to RGB (``images.to_rgb``) and stored as
JPEG, so training reads the same pixels with ``image_decoder="pil"`` or ``"tfds"``.

The command line is ``sycoca_jax.data.prepare``; VQA data has its own converter
(``vqa_converter``) built on this one.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import json
import multiprocessing
import re
from collections.abc import Iterable, Iterator
from typing import Any

import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from sycoca_jax.data import images, readers, sources
from sycoca_jax.data.skipping import BadRecord

SUMMARY_FILE = "conversion_summary.json"
_CHUNK = 256  # records per unit of work handed to the validation processes
_STORED_AS_IS = ("RGB", "L")  # modes every decoder (PIL, OpenCV, TFDS) reads as 8-bit RGB/grey


class NothingUsableError(ValueError):
    """A split of the input had no usable record (its summary is written all the same)."""


@dataclasses.dataclass(frozen=True)
class ConversionOptions:
    min_image_size: int = 32
    max_image_side: int = 0  # > 0: re-encode (JPEG) images whose longer side exceeds this
    max_image_pixels: int = images.MAX_IMAGE_PIXELS  # larger images are skipped (bombs)
    jpeg_quality: int = 95
    num_workers: int = 0  # processes validating images; 0 = in this process
    image_key: str = "image"
    caption_key: str = "caption"


def check_sample(
    sample: readers.ImageText, options: ConversionOptions
) -> tuple[str | None, dict | None]:
    """``(None, record)`` for a good sample, ``(reason, None)`` otherwise. Decodes the whole
    image, so truncated files are caught here rather than during training."""
    if sample.problem:
        return sample.problem, None
    caption = (sample.caption or "").strip()
    if not caption:
        return "empty_caption", None
    if sample.image is None:
        return "missing_image", None
    try:
        encoded = _checked_image(sample.image, options)
    except BadRecord as e:
        return e.reason, None
    return None, {"key": sample.key, "image": encoded, "captions": [caption]}


def _checked_image(data: bytes, options: ConversionOptions) -> bytes:
    """The bytes to store for ``data``: as they are, or converted (module docstring)."""
    image = images.open_image(data, max_image_pixels=options.max_image_pixels)
    try:
        image.load()
    except Exception as e:  # PIL raises several types for corrupt data
        raise BadRecord("undecodable_image", str(e)) from e
    if min(image.size) < options.min_image_size:
        raise BadRecord("image_too_small", f"{image.size} < {options.min_image_size}")
    too_big = options.max_image_side and max(image.size) > options.max_image_side
    if image.mode in _STORED_AS_IS and "transparency" not in image.info and not too_big:
        return data
    try:
        rgb = images.to_rgb(image)
        if too_big:
            side = options.max_image_side
            rgb.thumbnail((side, side), Image.Resampling.BICUBIC)
        buffer = io.BytesIO()
        rgb.save(buffer, format="JPEG", quality=options.jpeg_quality)
    except Exception as e:  # a mode or pixel layout PIL cannot convert
        raise BadRecord("undecodable_image", str(e)) from e
    return buffer.getvalue()


def _check_chunk(args: tuple[list[readers.ImageText], ConversionOptions]):
    samples, options = args
    return [check_sample(s, options) for s in samples]


def _chunks(samples: Iterable[readers.ImageText]) -> Iterator[list[readers.ImageText]]:
    chunk: list[readers.ImageText] = []
    for sample in samples:
        chunk.append(sample)
        if len(chunk) == _CHUNK:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def checked_samples(
    samples: Iterable[readers.ImageText], options: ConversionOptions
) -> Iterator[tuple[str | None, dict | None]]:
    """``check_sample`` over ``samples`` in input order, in ``options.num_workers`` processes
    with a bounded number of chunks in flight (the input is never read far ahead)."""
    if options.num_workers <= 0:
        for sample in samples:
            yield check_sample(sample, options)
        return
    context = multiprocessing.get_context("spawn")
    with context.Pool(options.num_workers) as pool:
        pending = collections.deque()
        for chunk in _chunks(samples):
            pending.append(pool.apply_async(_check_chunk, ((chunk, options),)))
            if len(pending) > 2 * options.num_workers:
                yield from pending.popleft().get()
        while pending:
            yield from pending.popleft().get()


class SplitCounter:
    """What one split's generator wrote and skipped; refuses a key already written."""

    def __init__(self, counts: collections.Counter):
        self.counts = counts
        self._keys: set[str] = set()

    def admit(self, key: str, reason: str | None) -> bool:
        """Counts the record; True when it is to be written."""
        if reason is None and key in self._keys:
            reason = "duplicate_key"
        if reason is not None:
            self.counts[reason] += 1
            return False
        self._keys.add(key)
        self.counts["written"] += 1
        return True

    def finish(self, split: str) -> None:
        if not self.counts["written"]:
            raise NothingUsableError(split)


class ImageTextDataset(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """An image-caption dataset built from local files; named at construction."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Converted with sycoca_jax.data.prepare."}

    def __init__(
        self,
        *,
        name: str,
        split_sources: dict[str, Any] | None = None,
        options: ConversionOptions | None = None,
        **kwargs,
    ):
        if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
            raise ValueError(f"dataset name {name!r} must be snake_case (e.g. cc3m, my_pairs)")
        self.name = name
        self._split_sources = split_sources or {}
        self._options = options or ConversionOptions()
        self.counts: dict[str, collections.Counter] = {}
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Image-caption pairs converted from local files.",
            features=tfds.features.FeaturesDict(
                {
                    "key": tfds.features.Text(),
                    "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
                    "captions": tfds.features.Sequence(tfds.features.Text()),
                }
            ),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {
            split: self._generate_examples(split, source)
            for split, source in self._split_sources.items()
        }

    def check_sources(self) -> None:
        """Raises ``FileNotFoundError`` naming a missing input; run before anything is written."""
        for source in self._split_sources.values():
            readers.find_inputs(source)

    def split_counter(self, split: str) -> SplitCounter:
        return SplitCounter(self.counts.setdefault(split, collections.Counter()))

    def _generate_examples(self, split: str, source: str):
        counter = self.split_counter(split)
        samples = readers.iter_source(
            source, image_key=self._options.image_key, caption_key=self._options.caption_key
        )
        for reason, record in checked_samples(samples, self._options):
            key = record["key"] if record else None
            if counter.admit(key, reason):
                yield key, record
        counter.finish(split)


def conversion_summary(counts: dict[str, collections.Counter]) -> dict:
    """``{"written": n, "skipped": {reason: n}, "splits": {split: {...}}}`` (reasons sorted)."""
    splits = {}
    total_skipped: collections.Counter = collections.Counter()
    for split, counter in counts.items():
        skipped = {k: v for k, v in sorted(counter.items()) if k != "written" and v}
        splits[split] = {"written": counter["written"], "skipped": skipped}
        total_skipped.update(skipped)
    return {
        "written": sum(s["written"] for s in splits.values()),
        "skipped": dict(sorted(total_skipped.items())),
        "splits": splits,
    }


def convert_local(
    split_sources: dict[str, Any],  # each split's source, in the form builder_class reads
    *,
    name: str,
    data_dir: str | None = None,
    options: ConversionOptions | None = None,
    builder_class: type[ImageTextDataset] = ImageTextDataset,
) -> dict:
    """Builds ``<data_dir>/<name>/1.0.0`` from local files with ``builder_class`` (image-caption
    pairs; ``vqa_converter.VQADataset`` for questions and answers); returns (and writes) the
    summary."""
    builder = builder_class(
        name=name,
        split_sources=split_sources,
        options=options,
        data_dir=sources.resolve_data_dir(data_dir),
        file_format="array_record",
    )
    return build_with_summary(builder)


def build_with_summary(builder: ImageTextDataset) -> dict:
    """Builds a converter's dataset and writes its ``conversion_summary.json``: refuses to
    overwrite an existing build, and checks the inputs (``builder.check_sources``: raising on a
    missing one) before anything is written. ``builder.counts`` holds what its generator wrote
    and skipped.

    A split without one usable record fails the build with ``NothingUsableError`` (nothing is
    written but the summary, in the folder the data would have filled; a new build may reuse it).
    """
    name, folder = builder.name, epath.Path(builder.data_dir)
    if builder.is_prepared():
        raise FileExistsError(
            f"dataset {name!r} already exists in {folder}; delete that folder to rebuild it, or "
            "pick another --name"
        )
    builder.check_sources()
    if folder.exists() and [p.name for p in folder.iterdir()] == [SUMMARY_FILE]:
        folder.rmtree()  # what a failed conversion left: its summary alone
    try:
        builder.download_and_prepare(
            file_format="array_record",
            download_config=tfds.download.DownloadConfig(try_download_gcs=False),
        )
    except NothingUsableError as e:
        summary = conversion_summary(builder.counts)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
        split = e.args[0]
        skipped = summary["splits"][split]["skipped"] or "nothing was read"
        raise NothingUsableError(
            f"dataset {name!r}: split {split!r} has no usable record (skipped: {skipped}); "
            f"nothing was written but {folder / SUMMARY_FILE}. Fix the input or leave the "
            "split out."
        ) from None
    summary = conversion_summary(builder.counts)
    (folder / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    return summary
