"""eval_results.json is never lost: atomic replacement, a torn old file kept aside, and an
unwritable workdir refused before any metric is computed."""

from __future__ import annotations

import json

import pytest
from etils import epath

from sycoca_jax import evaluate
from sycoca_jax.evaluation import registry, results
from tests.helpers import config_for


def test_results_merge_per_entry_with_their_steps(tmp_path):
    registry.write_results(str(tmp_path), 10, {"a": {"top1": 0.5}, "b": {"cider": 1.0}})
    registry.write_results(str(tmp_path), 20, {"a": {"top1": 0.75}})
    stored = json.loads((tmp_path / "eval_results.json").read_text())
    assert stored == {"a": {"top1": 0.75, "step": 20}, "b": {"cider": 1.0, "step": 10}, "step": 20}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval_results.json"]  # no temp files


@pytest.mark.parametrize("old", ['{"a": {"top1": 0.5, "st', "\xff\xfe", "[1, 2]"])
def test_a_torn_old_file_is_kept_aside_and_replaced(tmp_path, old):
    path = tmp_path / "eval_results.json"
    path.write_bytes(old.encode("latin-1"))
    (tmp_path / "eval_results.json.corrupt").write_text("an earlier torn file")
    registry.write_results(str(tmp_path), 30, {"a": {"top1": 0.25}})
    assert json.loads(path.read_text()) == {"a": {"top1": 0.25, "step": 30}, "step": 30}
    # Both torn files are kept: the older one untouched, the new one under the next free name.
    assert (tmp_path / "eval_results.json.corrupt").read_text() == "an earlier torn file"
    assert (tmp_path / "eval_results.json.corrupt.1").read_bytes() == old.encode("latin-1")


def test_a_write_that_dies_midway_leaves_the_previous_results(tmp_path, monkeypatch):
    registry.write_results(str(tmp_path), 10, {"a": {"top1": 0.5}})
    before = (tmp_path / "eval_results.json").read_text()

    def torn_write(self, text, *args, **kwargs):
        with open(self, "w") as f:
            f.write(text[: len(text) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(type(epath.Path(tmp_path)), "write_text", torn_write)
    with pytest.raises(OSError, match="No space left"):
        registry.write_results(str(tmp_path), 20, {"a": {"top1": 0.75}, "b": {"cider": 1.0}})
    monkeypatch.undo()
    assert (tmp_path / "eval_results.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval_results.json"]


def test_an_unwritable_workdir_fails_before_anything_is_computed(tmp_path, monkeypatch):
    blocker = tmp_path / "not_a_directory"
    blocker.write_text("")
    workdir = str(blocker / "run")  # cannot be created, whoever runs the test (root included)
    with pytest.raises(PermissionError, match=r"cannot write eval_results.json into .*run \("):
        results.check_writable(workdir)

    def load_for_eval(*args, **kwargs):
        raise AssertionError("the checkpoint was loaded before the workdir was checked")

    monkeypatch.setattr(evaluate, "load_for_eval", load_for_eval)
    with pytest.raises(PermissionError, match="choose a writable --workdir"):
        evaluate.evaluate(config_for("tiny"), workdir, checkpoint=str(tmp_path))
