"""The training stream is a function of the config: every process layout and worker count reads
the same global batches (augmentation and caption choice included, bad records too), and a
position saved by N processes resumes on M. (Worker processes: tests/data/test_pipeline.py; real
processes with jax.distributed: tests/test_multiprocess.py.)"""

from __future__ import annotations

import json

import numpy as np
import pytest

from sycoca_jax.data import iterator_state, pipeline, sources, stream, tokenizer
from sycoca_jax.data.skipping import SKIP_REASONS, SkipCountingIterator
from tests.data.test_pipeline import _bad_positions, _BrokenSource

SPEC = sources.dataset_spec("sycoca_shapes")
GLOBAL_BATCH = 16  # 96 records: an epoch is 6 global batches


@pytest.fixture(scope="module")
def bundled():
    return tokenizer.load_tokenizer(None)


@pytest.fixture(scope="module")
def broken(train_source):
    return _BrokenSource(train_source, _bad_positions(len(train_source)))


def _iterator(source, tok, index=0, count=1, batch=GLOBAL_BATCH, **options):
    dataset = pipeline.train_dataset(
        source,
        spec=SPEC,
        tokenizer=tok,
        image_size=32,
        max_text_len=16,
        global_batch_size=batch,
        seed=5,
        process_index=index,
        process_count=count,
        min_image_size=16,
        **options,  # crop_scale stays at its default: augmentation on
    )
    return SkipCountingIterator(iter(dataset), max_skipped_fraction=0.5)


def _global_batches(source, tok, count, steps, **options):
    """``steps`` global batches read by ``count`` processes, their rows put side by side."""
    iterators = [_iterator(source, tok, i, count, **options) for i in range(count)]
    batches = []
    for _ in range(steps):
        parts = [next(it) for it in iterators]
        batches.append({k: np.concatenate([p[k] for p in parts]) for k in parts[0]})
    for it in iterators:
        it.close()
    return batches, iterators


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def test_every_layout_reads_the_same_global_batches(broken, bundled):
    """1, 2 and 4 processes (and thread or process workers) see identical global batches over
    two epochs: same records, same crops, same captions, same replacements of bad records."""
    one, [single] = _global_batches(broken, bundled, 1, 14)
    two, pair = _global_batches(broken, bundled, 2, 14)
    four, _ = _global_batches(broken, bundled, 4, 14, num_workers=2, prefetch="thread")
    _assert_same(one, two)
    _assert_same(one, four)
    assert sum(single.stats.skipped.values()) > 0  # bad records were met and replaced ...
    for reason in SKIP_REASONS:  # ... and counted once over all processes
        assert sum(it.stats.skipped[reason] for it in pair) == single.stats.skipped[reason]
    # Augmentation is on: an image differs from its previous epoch's crop.
    assert not np.array_equal(one[0]["image"], one[6]["image"])


def test_each_epoch_visits_every_record_once_in_a_new_order():
    order = stream.Order(10, seed=3)
    epochs = [[order.record(e * 10 + i) for i in range(10)] for e in range(3)]
    for e, epoch in enumerate(epochs):
        assert {ep for ep, _ in epoch} == {e}
        assert sorted(r for _, r in epoch) == list(range(10))  # no record sits out
    assert len({tuple(r for _, r in epoch) for epoch in epochs}) == 3
    assert [stream.Order(10, seed=4).record(i)[1] for i in range(10)] != [r for _, r in epochs[0]]


def _saved(iterators):
    return [json.loads(json.dumps(it.get_state())) for it in iterators]  # as checkpoints do


@pytest.mark.parametrize("saved_on,resumed_on", [(2, 1), (1, 2), (2, 4)])
def test_a_position_saved_by_n_processes_resumes_on_m(broken, bundled, saved_on, resumed_on):
    straight, _ = _global_batches(broken, bundled, 1, 9)
    _, before = _global_batches(broken, bundled, saved_on, 5)
    saved = _saved(before)
    after = []
    for index in range(resumed_on):
        iterator = _iterator(broken, bundled, index, resumed_on)
        iterator.set_state(iterator.resume_state(saved, index, resumed_on))
        after.append(iterator)
    resumed = []
    for _ in range(4):
        parts = [next(it) for it in after]
        resumed.append({k: np.concatenate([p[k] for p in parts]) for k in parts[0]})
    _assert_same(straight[5:], resumed)
    for reason in SKIP_REASONS:  # totals over all processes are kept
        total = sum(s["skipped"][reason] for s in saved)
        assert sum(it.stats.skipped[reason] for it in after) >= total
    assert sum(it.stats.examples for it in after) == 9 * GLOBAL_BATCH
    for iterator in after:
        iterator.close()


def test_position_is_independent_of_the_batch_size(broken, bundled):
    """The stream is positions, not batches: batches of 24 from position 48 are positions
    48..71, the same examples batches of 16 hold there."""
    sixteen, [it16] = _global_batches(broken, bundled, 1, 5)
    state = it16.get_state()
    assert state["pipeline"] == {"position": 48 + 32}
    rows = np.concatenate([b["image"] for b in sixteen])
    resumed = _iterator(broken, bundled, batch=24)
    resumed.set_state({**state, "pipeline": {"position": 48}})
    np.testing.assert_array_equal(next(resumed)["image"], rows[48:72])
    with pytest.raises(ValueError, match="not a whole number of global batches of 32"):
        _iterator(broken, bundled, batch=32).set_state(state)


def test_a_state_saved_before_positions_were_global(broken, bundled):
    """Checkpoints written before this stream (grain's per-process state) resume at the same
    number of examples read."""
    straight, _ = _global_batches(broken, bundled, 1, 4)
    legacy = {"pipeline": {"next_index": 37}, "examples": 24, "skipped": {"empty_caption": 2}}
    iterator = _iterator(broken, bundled, 0, 2)  # process 0 of 2 had read 24: position 48
    iterator.set_state(legacy)
    np.testing.assert_array_equal(next(iterator)["image"], straight[3]["image"][:8])
    assert iterator.stats.skipped["empty_caption"] == 2
    merged = iterator.resume_state([legacy, legacy], 0, 1)
    assert merged["pipeline"] == {"position": 48} and merged["examples"] == 48
    iterator.close()


def test_handler_merges_the_files_of_another_process_count(broken, bundled, tmp_path):
    _, pair = _global_batches(broken, bundled, 2, 3)
    for index, state in enumerate(_saved(pair)):
        (tmp_path / f"process_{index}-of-2.json").write_text(json.dumps(state))
    iterator = _iterator(broken, bundled)
    iterator_state.DataStateHandler().restore(
        tmp_path, item=iterator
    )  # this test runs as 1 process
    assert iterator.get_state()["pipeline"] == {"position": 3 * GLOBAL_BATCH}
    assert iterator.stats.examples == 3 * GLOBAL_BATCH
    iterator.close()
    (tmp_path / "process_1-of-2.json").unlink()
    with pytest.raises(ValueError, match=r"lacks the data-iterator state of processes \[1\]"):
        iterator_state.DataStateHandler().restore(tmp_path, item=_iterator(broken, bundled))
