"""Prepare datasets as ArrayRecord TFDS datasets (no TensorFlow): the command line.

Convert local image-caption data (CC3M/CC12M as img2dataset writes them, or a JSONL/CSV of image
paths and captions; ``sycoca_jax.data.converter``)::

  python -m sycoca_jax.data.prepare local --source=/data/cc3m/train_shards \\
      --source=validation=/data/cc3m/val_shards --name=cc3m --data_dir=/data/tfds

Bad records (undecodable images or text, empty or non-string captions, images below
``--min_image_size`` or above ``--max_image_pixels``, missing images, duplicate keys, unreadable
rows/shards) are skipped and counted; ``conversion_summary.json`` next to the data (and stdout)
says ``{"written": n, "skipped": {"<reason>": n, ...}, "splits": {...}}``.

Convert local VQA data (image, question, human answers; ``sycoca_jax.data.vqa_converter``)::

  python -m sycoca_jax.data.prepare vqa --source=/data/vqa/train.jsonl --name=coco_vqa

Generate the embedded dataset ahead of time (it is otherwise generated on first use)::

  python -m sycoca_jax.data.prepare shapes --data_dir=/data/tfds [--image_size=64 ...]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Sequence
from typing import Any

from sycoca_jax.data import converter, shapes_builder, sources, vqa_converter


def parse_sources(values: Sequence[str]) -> dict[str, str]:
    """``PATH`` (the train split) or ``SPLIT=PATH``, repeatable."""
    out: dict[str, str] = {}
    for value in values:
        match = re.match(r"^([A-Za-z_]\w*)=(.+)$", value)
        split, path = (match.group(1), match.group(2)) if match else ("train", value)
        if split in out:
            raise SystemExit(f"split {split!r} given twice in --source")
        out[split] = path
    return out


def _add_image_options(command: argparse.ArgumentParser) -> None:
    defaults = converter.ConversionOptions
    command.add_argument(
        "--data_dir", default=None, help=f"default ${sources.DATA_DIR_ENV} or ~/tensorflow_datasets"
    )
    command.add_argument("--min_image_size", type=int, default=defaults.min_image_size)
    command.add_argument(
        "--max_image_side",
        type=int,
        default=0,
        help="re-encode images whose longer side exceeds this (0: keep bytes)",
    )
    command.add_argument(
        "--max_image_pixels",
        type=int,
        default=defaults.max_image_pixels,
        help="skip images with more pixels than this (decompression bombs)",
    )
    command.add_argument(
        "--num_workers",
        type=int,
        default=os.cpu_count() or 1,
        help="processes that decode images to validate them",
    )


def _options(args: argparse.Namespace, **keys: str) -> converter.ConversionOptions:
    return converter.ConversionOptions(
        min_image_size=args.min_image_size,
        max_image_side=args.max_image_side,
        max_image_pixels=args.max_image_pixels,
        num_workers=args.num_workers,
        **keys,
    )


def _add_local(commands: Any) -> None:
    local = commands.add_parser("local", help="convert local image-caption data")
    local.add_argument(
        "--source",
        action="append",
        required=True,
        help="tar-shard folder, .jsonl/.csv/.tsv file or glob; SPLIT=PATH for a "
        "split other than train; repeatable",
    )
    local.add_argument("--name", required=True, help="dataset name, e.g. cc3m")
    _add_image_options(local)
    local.add_argument("--image_key", default="image", help="JSONL key / CSV column of images")
    local.add_argument("--caption_key", default="caption", help="... and of captions")


def _add_vqa(commands: Any) -> None:
    vqa = commands.add_parser("vqa", help="convert local VQA data (image, question, answers)")
    vqa.add_argument(
        "--source",
        action="append",
        default=[],
        help="JSONL of questions; SPLIT=PATH for a split other than train; repeatable",
    )
    vqa.add_argument(
        "--official",
        action="append",
        default=[],
        help="SPLIT=QUESTIONS.json,ANNOTATIONS.json,IMAGE_FOLDER (VQAv2 files); repeatable",
    )
    vqa.add_argument("--name", required=True, help="dataset name, e.g. coco_vqa")
    _add_image_options(vqa)


def _add_shapes(commands: Any) -> None:
    shapes = commands.add_parser("shapes", help="generate the embedded sycoca_shapes dataset")
    shapes.add_argument("--data_dir", default=None)
    shapes.add_argument("--image_size", type=int, default=shapes_builder.DEFAULT_IMAGE_SIZE)
    for split, size in shapes_builder.DEFAULT_SPLIT_SIZES.items():
        shapes.add_argument(f"--num_{split}", type=int, default=size)
    shapes.add_argument("--seed", type=int, default=0)


def parser() -> argparse.ArgumentParser:
    out = argparse.ArgumentParser(
        prog="python -m sycoca_jax.data.prepare", description=__doc__.split("\n")[0]
    )
    commands = out.add_subparsers(dest="command", required=True)
    _add_local(commands)
    _add_vqa(commands)
    _add_shapes(commands)
    return out


def run_local(args: argparse.Namespace) -> dict:
    options = _options(args, image_key=args.image_key, caption_key=args.caption_key)
    return converter.convert_local(
        parse_sources(args.source), name=args.name, data_dir=args.data_dir, options=options
    )


def run_vqa(args: argparse.Namespace) -> dict:
    split_sources: dict[str, Any] = dict(parse_sources(args.source))
    for split, value in parse_sources(args.official).items():
        parts = tuple(value.split(","))
        if len(parts) != 3:
            raise SystemExit(f"--official {split}={value}: expected QUESTIONS,ANNOTATIONS,IMAGES")
        if split in split_sources:
            raise SystemExit(f"split {split!r} given twice")
        split_sources[split] = parts
    if not split_sources:
        raise SystemExit("give at least one --source or --official")
    return vqa_converter.convert_vqa(
        split_sources, name=args.name, data_dir=args.data_dir, options=_options(args)
    )


def run_shapes(args: argparse.Namespace) -> None:
    config = shapes_builder.shapes_config(
        args.image_size, args.num_train, args.num_validation, args.num_test, args.seed
    )
    start = time.perf_counter()
    builder = shapes_builder.prepare(config, sources.resolve_data_dir(args.data_dir))
    print(
        f"sycoca_shapes/{config.name} ready in {builder.data_dir} "
        f"({time.perf_counter() - start:.1f} s)"
    )


def main(argv: Sequence[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if args.command == "shapes":
        run_shapes(args)
        return
    summary = run_local(args) if args.command == "local" else run_vqa(args)
    print(json.dumps(summary, indent=2))


def run() -> None:
    """Console-script entry point (``sycoca-prepare``): a mistake in the input (nothing usable,
    a missing source, an existing dataset) is one line on stderr and exit status 1."""
    try:
        main(sys.argv[1:])
    except (converter.NothingUsableError, FileExistsError, FileNotFoundError) as e:
        sys.exit(f"prepare: {e}")


if __name__ == "__main__":
    run()
