"""Prepare datasets as ArrayRecord TFDS datasets (no TensorFlow).

Convert local image-caption data (CC3M/CC12M as img2dataset writes them, or a JSONL/CSV of image
paths and captions)::

  python -m sycoca_jax.data.prepare local --source=/data/cc3m/train_shards \\
      --source=validation=/data/cc3m/val_shards --name=cc3m --data_dir=/data/tfds

Bad records (undecodable images, empty captions, images below ``--min_image_size``, missing
images, unreadable rows/shards) are skipped and counted; ``conversion_summary.json`` next to the
data (and stdout) says ``{"written": n, "skipped": {"<reason>": n, ...}, "splits": {...}}``.

Convert local VQA data (image, question, human answers; see ``sycoca_jax.data.prepare_vqa``)::

  python -m sycoca_jax.data.prepare vqa --source=/data/vqa/train.jsonl --name=coco_vqa

Generate the embedded dataset ahead of time (it is otherwise generated on first use)::

  python -m sycoca_jax.data.prepare shapes --data_dir=/data/tfds [--image_size=64 ...]
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import io
import json
import multiprocessing
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence

import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from sycoca_jax.data import readers, shapes_builder, sources

SUMMARY_FILE = "conversion_summary.json"
_CHUNK = 256  # records per unit of work handed to the validation processes


@dataclasses.dataclass(frozen=True)
class ConversionOptions:
    min_image_size: int = 32
    max_image_side: int = 0  # > 0: re-encode (JPEG) images whose longer side exceeds this
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
        image = Image.open(io.BytesIO(sample.image))
        image.load()
    except Exception:  # PIL raises several types for corrupt data
        return "undecodable_image", None
    if min(image.size) < options.min_image_size:
        return "image_too_small", None
    encoded = sample.image
    if options.max_image_side and max(image.size) > options.max_image_side:
        image = image.convert("RGB")
        image.thumbnail((options.max_image_side, options.max_image_side), Image.Resampling.BICUBIC)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=options.jpeg_quality)
        encoded = buffer.getvalue()
    return None, {"key": sample.key, "image": encoded, "captions": [caption]}


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


class ImageTextDataset(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """An image-caption dataset built from local files; named at construction."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Converted with sycoca_jax.data.prepare."}

    def __init__(
        self,
        *,
        name: str,
        split_sources: dict[str, str] | None = None,
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

    def _generate_examples(self, split: str, source: str):
        counts = self.counts.setdefault(split, collections.Counter())
        samples = readers.iter_source(
            source, image_key=self._options.image_key, caption_key=self._options.caption_key
        )
        for reason, record in checked_samples(samples, self._options):
            if reason is None:
                counts["written"] += 1
                yield record["key"], record
            else:
                counts[reason] += 1


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
    split_sources: dict[str, str],
    *,
    name: str,
    data_dir: str | None = None,
    options: ConversionOptions | None = None,
) -> dict:
    """Builds ``<data_dir>/<name>/1.0.0`` from local files; returns (and writes) the summary."""
    data_dir = sources.resolve_data_dir(data_dir)
    builder = ImageTextDataset(
        name=name,
        split_sources=split_sources,
        options=options,
        data_dir=data_dir,
        file_format="array_record",
    )

    def check_inputs() -> None:
        for source in split_sources.values():
            readers.find_inputs(source)

    return build_with_summary(builder, name, check_inputs)


def build_with_summary(
    builder: tfds.core.GeneratorBasedBuilder, name: str, check_inputs: Callable[[], None]
) -> dict:
    """Builds a converter's dataset and writes its ``conversion_summary.json``: refuses to
    overwrite an existing build, and runs ``check_inputs`` (raising on a missing input) before
    anything is written. ``builder.counts`` holds what its generator wrote and skipped."""
    if builder.is_prepared():
        raise FileExistsError(
            f"dataset {name!r} already exists in {builder.data_dir}; delete that folder to "
            "rebuild it, or pick another --name"
        )
    check_inputs()
    builder.download_and_prepare(
        file_format="array_record",
        download_config=tfds.download.DownloadConfig(try_download_gcs=False),
    )
    summary = conversion_summary(builder.counts)
    (epath.Path(builder.data_dir) / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    return summary


def _parse_sources(values: Sequence[str]) -> dict[str, str]:
    """``PATH`` (the train split) or ``SPLIT=PATH``, repeatable."""
    out: dict[str, str] = {}
    for value in values:
        match = re.match(r"^([A-Za-z_]\w*)=(.+)$", value)
        split, path = (match.group(1), match.group(2)) if match else ("train", value)
        if split in out:
            raise SystemExit(f"split {split!r} given twice in --source")
        out[split] = path
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m sycoca_jax.data.prepare", description=__doc__.split("\n")[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    local = commands.add_parser("local", help="convert local image-caption data")
    local.add_argument(
        "--source",
        action="append",
        required=True,
        help="tar-shard folder, .jsonl/.csv/.tsv file or glob; SPLIT=PATH for a "
        "split other than train; repeatable",
    )
    local.add_argument("--name", required=True, help="dataset name, e.g. cc3m")
    local.add_argument(
        "--data_dir", default=None, help=f"default ${sources.DATA_DIR_ENV} or ~/tensorflow_datasets"
    )
    local.add_argument("--min_image_size", type=int, default=ConversionOptions.min_image_size)
    local.add_argument(
        "--max_image_side",
        type=int,
        default=0,
        help="re-encode images whose longer side exceeds this (0: keep bytes)",
    )
    local.add_argument(
        "--num_workers",
        type=int,
        default=os.cpu_count() or 1,
        help="processes that decode images to validate them",
    )
    local.add_argument("--image_key", default="image", help="JSONL key / CSV column of images")
    local.add_argument("--caption_key", default="caption", help="... and of captions")

    from sycoca_jax.data import prepare_vqa  # it builds on this module

    prepare_vqa.add_command(commands)

    shapes = commands.add_parser("shapes", help="generate the embedded sycoca_shapes dataset")
    shapes.add_argument("--data_dir", default=None)
    shapes.add_argument("--image_size", type=int, default=shapes_builder.DEFAULT_IMAGE_SIZE)
    for split, size in shapes_builder.DEFAULT_SPLIT_SIZES.items():
        shapes.add_argument(f"--num_{split}", type=int, default=size)
    shapes.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    if args.command == "local":
        options = ConversionOptions(
            min_image_size=args.min_image_size,
            max_image_side=args.max_image_side,
            num_workers=args.num_workers,
            image_key=args.image_key,
            caption_key=args.caption_key,
        )
        summary = convert_local(
            _parse_sources(args.source), name=args.name, data_dir=args.data_dir, options=options
        )
        print(json.dumps(summary, indent=2))
    elif args.command == "vqa":
        print(json.dumps(prepare_vqa.run_command(args), indent=2))
    else:
        config = shapes_builder.shapes_config(
            args.image_size, args.num_train, args.num_validation, args.num_test, args.seed
        )
        start = time.perf_counter()
        builder = shapes_builder.prepare(config, sources.resolve_data_dir(args.data_dir))
        print(
            f"sycoca_shapes/{config.name} ready in {builder.data_dir} "
            f"({time.perf_counter() - start:.1f} s)"
        )


def run() -> None:
    """Console-script entry point (``sycoca-prepare``)."""
    main(sys.argv[1:])


if __name__ == "__main__":
    run()
