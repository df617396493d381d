"""Readers of a user's local image-caption data, for the converter (``prepare local``).

Inputs:
  * webdataset tar shards as img2dataset writes them: members ``<key>.jpg|.jpeg|.png|.webp``
    with ``<key>.txt`` (the caption) and/or ``<key>.json`` (``{"caption": ...}``), a sample's
    members next to each other in the tar;
  * a JSONL file, one ``{"image": <path>, "caption": <text>}`` per line;
  * a CSV (``,``) or TSV (``\\t``) file with a header naming the image and caption columns.
Image paths in JSONL/CSV are relative to the file's folder unless absolute. ``source`` may be
one of these files, a folder (its ``*.tar`` shards, else its ``.jsonl``/``.csv``/``.tsv``
files), or a glob pattern.

Text is UTF-8 (a leading byte-order mark, as spreadsheet programs write, is dropped). Readers never
decide whether an image is good: they yield what they found (``None`` for a missing image or
caption) and name what is wrong with the rest (``problem``: a row or shard that cannot be read,
text that is not UTF-8, a caption that is not a string), and the converter counts every reason.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import json
import os
import re
import tarfile
from collections.abc import Iterator

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp")
TABLE_EXTENSIONS = (".jsonl", ".csv", ".tsv")
# Bytes that are not UTF-8 (read with "surrogateescape"), or a lone surrogate escaped in JSON.
_SURROGATES = re.compile("[\ud800-\udfff]")


@dataclasses.dataclass(frozen=True)
class ImageText:
    """One sample as found in the input; ``problem`` names why it is unusable, if known."""

    key: str
    image: bytes | None
    caption: str | None
    problem: str | None = None


def find_inputs(source: str) -> list[str]:
    """The input files of ``source`` (a file, a folder or a glob), sorted."""
    if os.path.isdir(source):
        shards = sorted(glob.glob(os.path.join(source, "*.tar")))
        if shards:
            return shards
        tables = sorted(
            p for p in glob.glob(os.path.join(source, "*")) if p.endswith(TABLE_EXTENSIONS)
        )
        if tables:
            return tables
        raise FileNotFoundError(f"no *.tar shards and no .jsonl/.csv/.tsv files in {source!r}")
    if os.path.isfile(source):
        return [source]
    matches = sorted(glob.glob(source))
    if not matches:
        raise FileNotFoundError(f"source {source!r} matches no file")
    return matches


def iter_source(
    source: str, *, image_key: str = "image", caption_key: str = "caption"
) -> Iterator[ImageText]:
    """Every sample of every input file of ``source``, keys prefixed by the file's index."""
    for file_index, path in enumerate(find_inputs(source)):
        if path.endswith(".tar"):
            samples = iter_webdataset_shard(path)
        elif path.endswith(TABLE_EXTENSIONS):
            samples = iter_table(path, image_key=image_key, caption_key=caption_key)
        else:
            raise ValueError(f"cannot read {path!r}: expected .tar, .jsonl, .csv or .tsv")
        for sample in samples:
            # A key is an identifier: bytes that are not UTF-8 in a member name stay visible.
            key = sample.key.encode("utf-8", "backslashreplace").decode("utf-8")
            yield dataclasses.replace(sample, key=f"{file_index:05d}/{key}")


def _split_member_name(name: str) -> tuple[str, str]:
    """webdataset convention: the key is the path up to the first dot of the file name."""
    folder, base = os.path.split(name)
    stem, _, extension = base.partition(".")
    return os.path.join(folder, stem), extension.lower()


def iter_webdataset_shard(path: str) -> Iterator[ImageText]:
    """Samples of one tar shard; a shard that breaks off midway yields a ``problem`` sample."""
    current_key: str | None = None
    parts: dict[str, bytes] = {}
    try:
        with tarfile.open(path, "r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, extension = _split_member_name(member.name)
                # A repeated member (key.jpg twice) starts another sample of the same key: the
                # converter keeps the first good one and counts the rest as duplicate_key.
                if key != current_key or extension in parts:
                    if current_key is not None:
                        yield _webdataset_sample(current_key, parts)
                    current_key, parts = key, {}
                data = tar.extractfile(member)
                parts[extension] = data.read() if data else b""
    except (tarfile.TarError, OSError, EOFError):
        yield ImageText(f"{os.path.basename(path)}:error", None, None, problem="unreadable_shard")
    if current_key is not None:
        yield _webdataset_sample(current_key, parts)


def _webdataset_sample(key: str, parts: dict[str, bytes]) -> ImageText:
    image = next((parts[e] for e in IMAGE_EXTENSIONS if e in parts), None)
    caption, problem = None, None
    if "txt" in parts:
        try:
            caption = parts["txt"].decode("utf-8-sig")
        except UnicodeDecodeError:
            problem = "undecodable_text"
    elif "json" in parts:
        try:
            meta = json.loads(parts["json"].decode("utf-8-sig"))
        except UnicodeDecodeError:
            problem = "undecodable_text"
        except ValueError:
            problem = "unreadable_sidecar"
        else:
            caption = meta.get("caption") if isinstance(meta, dict) else None
            problem = _caption_problem(caption) or (
                "undecodable_text" if has_undecodable_text(caption) else None
            )
    return ImageText(key, image, None if problem else caption, problem=problem)


def _caption_problem(caption: object) -> str | None:
    """A caption must be a string (or absent: then the sample has none)."""
    return None if caption is None or isinstance(caption, str) else "bad_caption_type"


def has_undecodable_text(*texts: object) -> bool:
    """Whether text holds bytes that were not UTF-8 (read with ``errors="surrogateescape"``) or
    surrogates no encoder accepts."""
    return any(isinstance(t, str) and _SURROGATES.search(t) for t in texts)


def iter_table(
    path: str, *, image_key: str = "image", caption_key: str = "caption"
) -> Iterator[ImageText]:
    """Rows of a JSONL / CSV / TSV file; the images are read from disk. A row with bytes that are
    not UTF-8 is reported as ``undecodable_text`` and the rows after it are still read."""
    folder = os.path.dirname(os.path.abspath(path))
    with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
        if path.endswith(".jsonl"):
            rows = _jsonl_rows(f)
        else:
            rows = csv.DictReader(f, delimiter="\t" if path.endswith(".tsv") else ",")
            if rows.fieldnames is None or {image_key, caption_key} - set(rows.fieldnames):
                raise ValueError(
                    f"{path}: the header must name columns {image_key!r} and {caption_key!r} "
                    f"(got {rows.fieldnames}); pass --image_key/--caption_key"
                )
        for line, row in enumerate(rows):
            key = f"row{line:09d}"
            if row is _UNDECODABLE or (
                isinstance(row, dict) and has_undecodable_text(*row.values(), *row.keys())
            ):
                yield ImageText(key, None, None, problem="undecodable_text")
                continue
            if row is None or not isinstance(row, dict) or image_key not in row:
                yield ImageText(key, None, None, problem="unreadable_row")
                continue
            caption = row.get(caption_key)
            if problem := _caption_problem(caption):
                yield ImageText(key, None, None, problem=problem)
                continue
            image_path = os.path.join(folder, str(row[image_key]))
            try:
                with open(image_path, "rb") as image_file:
                    image = image_file.read()
            except OSError:
                yield ImageText(key, None, caption, problem="missing_image")
                continue
            yield ImageText(key, image, caption)


_UNDECODABLE = object()  # a JSONL line with bytes that are not UTF-8


def _jsonl_rows(lines) -> Iterator[dict | None | object]:
    for line in lines:
        if not line.strip():
            continue
        if has_undecodable_text(line):
            yield _UNDECODABLE
            continue
        try:
            yield json.loads(line)
        except ValueError:
            yield None
