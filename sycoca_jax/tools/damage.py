"""Ways a checkpoint step gets damaged on real storage, each applied to one step folder.

Used by ``tools.fault_drill`` and the tests to check that a damaged newest step is detected and
the run falls back to the previous one. Each function takes ``checkpoints/<step>`` and damages
it in place (orbax's layout: ``state/`` is an OCDBT database with ``_METADATA``,
``manifest.ocdbt`` and its data files under ``d/``; ``data/`` holds the iterator JSON per
process).
"""

from __future__ import annotations

import pathlib
import shutil
from collections.abc import Callable


def array_files(step_dir: pathlib.Path) -> list[pathlib.Path]:
    """The state's biggest OCDBT data file (the array chunks); orbax may keep an identical copy
    in the per-process database beside the merged one, so every file of that size."""
    state = step_dir / "state"
    files = [*(state / "d").glob("*"), *state.glob("ocdbt.process_*/d/*")]
    size = max(p.stat().st_size for p in files)
    return [p for p in files if p.stat().st_size == size]


def _truncate(path: pathlib.Path, size: int) -> None:
    path.write_bytes(path.read_bytes()[:size])


def truncate_file(step_dir: pathlib.Path) -> None:
    for path in array_files(step_dir):
        _truncate(path, path.stat().st_size // 2)


def delete_file(step_dir: pathlib.Path) -> None:
    for path in array_files(step_dir):
        path.unlink()


def remove_metadata(step_dir: pathlib.Path) -> None:
    (step_dir / "state" / "_METADATA").unlink()


def remove_manifest(step_dir: pathlib.Path) -> None:
    (step_dir / "state" / "manifest.ocdbt").unlink()


def remove_data_item(step_dir: pathlib.Path) -> None:
    shutil.rmtree(step_dir / "data")


def tear_iterator_json(step_dir: pathlib.Path) -> None:
    for path in (step_dir / "data").glob("process_*.json"):
        _truncate(path, 9)


def empty_step_folder(step_dir: pathlib.Path) -> None:
    shutil.rmtree(step_dir)
    step_dir.mkdir()


def flip_bytes(step_dir: pathlib.Path, count: int = 64) -> None:
    """Bit rot: ``count`` bytes inverted in the middle of the array chunks (the file stays
    readable; only the checksums can tell)."""
    for path in array_files(step_dir):
        data = bytearray(path.read_bytes())
        middle = len(data) // 2
        data[middle : middle + count] = bytes(b ^ 0xFF for b in data[middle : middle + count])
        path.write_bytes(bytes(data))


DAMAGES: dict[str, Callable[[pathlib.Path], None]] = {
    "file_truncated": truncate_file,
    "file_deleted": delete_file,
    "metadata_gone": remove_metadata,
    "manifest_gone": remove_manifest,
    "data_item_missing": remove_data_item,
    "iterator_json_torn": tear_iterator_json,
    "empty_step_folder": empty_step_folder,
    "bytes_flipped": flip_bytes,
}
