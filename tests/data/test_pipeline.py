"""The grain pipelines on a small sycoca_shapes build: batches, determinism, per-process slices,
resumption, skip counting, evaluation padding and global arrays."""

from __future__ import annotations

import io
import json

import jax
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec
from PIL import Image

from sycoca_jax.data import pipeline, sources, stream, tokenizer
from sycoca_jax.data.skipping import SKIP_REASONS, SkipCountingIterator, TooManySkippedError
from sycoca_jax.data.tokenizer import BOS_ID, EOS_ID
from tests.helpers import SMALL, SMALL_NAME, tiny_config

SPEC = sources.dataset_spec("sycoca_shapes")


@pytest.fixture(scope="module")
def bundled():
    return tokenizer.load_tokenizer(None)


def _train(source, tok, **kwargs):
    options = dict(
        spec=SPEC,
        tokenizer=tok,
        image_size=64,
        max_text_len=24,
        global_batch_size=8,
        seed=0,
        process_index=0,
        process_count=1,
    )
    options.update(kwargs)
    return pipeline.train_dataset(source, **options)


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def _assert_same(batches_a, batches_b):
    assert len(batches_a) == len(batches_b)
    for a, b in zip(batches_a, batches_b, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_train_batches_from_the_config(data_dir, bundled):
    iterator = pipeline.make_train_iterator(tiny_config(data_dir))
    batch = next(iterator)
    assert set(batch) == {"image", "tokens"}
    # uint8 pixels: the model normalises them on device (sycoca_jax.models.pixels).
    assert batch["image"].shape == (32, 64, 64, 3) and batch["image"].dtype == np.uint8
    assert batch["tokens"].shape == (32, 25) and batch["tokens"].dtype == np.int32
    assert (batch["tokens"][:, 0] == BOS_ID).all()
    assert ((batch["tokens"] == EOS_ID).sum(axis=1) == 1).all()
    assert batch["image"].min() < 64 and batch["image"].max() > 192  # the shapes' full range
    words = " ".join(bundled.decode(t) for t in batch["tokens"])
    assert any(colour in words for colour in ("red", "green", "blue"))
    assert iterator.stats.examples == 32 and iterator.stats.total_skipped == 0
    iterator.close()


def test_same_seed_same_batches_other_seed_other_batches(train_source, bundled):
    first = _take(iter(_train(train_source, bundled)), 3)
    again = _take(iter(_train(train_source, bundled, num_workers=2, prefetch="thread")), 3)
    _assert_same(first, again)
    other = _take(iter(_train(train_source, bundled, seed=1)), 3)
    assert not np.array_equal(first[0]["image"], other[0]["image"])


def _tokens_by_image(batches):
    return {
        image.tobytes(): tokens
        for batch in batches
        for image, tokens in zip(batch["image"], batch["tokens"], strict=True)
    }


def test_captions_vary_across_epochs(train_source, bundled):
    # 96 records, batches of 8: epoch 2 starts at batch 12 with a new order and new captions.
    batches = _take(iter(_train(train_source, bundled, crop_scale=(1.0, 1.0))), 24)
    epoch1, epoch2 = _tokens_by_image(batches[:12]), _tokens_by_image(batches[12:])
    assert epoch1.keys() == epoch2.keys()  # every image once per epoch (crop is the identity)
    changed = sum(not np.array_equal(epoch1[k], epoch2[k]) for k in epoch1)
    assert changed > len(epoch1) // 2  # one of 5 captions, drawn anew


class _IdCaptions:
    """The real source with every caption replaced by the record's id, so the ids can be read
    back from the tokens at the end of the pipeline."""

    def __init__(self, source):
        self.source = source

    def __len__(self):
        return len(self.source)

    def __getitem__(self, index):
        record = dict(self.source[index])
        record["captions"] = [record["id"]] * 5
        return record


def test_two_processes_read_disjoint_halves_end_to_end(train_source):
    ids = [r["id"].decode() for r in train_source]
    id_tokenizer = tokenizer.train_tokenizer(
        ids, vocab_size=64, model_type="bpe", character_coverage=1.0
    )
    seen = []
    for index in range(2):
        batches = _take(
            iter(
                _train(
                    _IdCaptions(train_source),
                    id_tokenizer,
                    global_batch_size=16,
                    process_index=index,
                    process_count=2,
                )
            ),
            6,
        )  # one epoch
        assert all(b["tokens"].shape == (8, 25) for b in batches)
        seen.append([id_tokenizer.decode(t) for b in batches for t in b["tokens"]])
    assert len(set(seen[0])) == len(seen[0]) == len(ids) // 2
    assert set(seen[0]).isdisjoint(seen[1]) and set(seen[0]) | set(seen[1]) == set(ids)
    with pytest.raises(ValueError, match="does not divide evenly over 2 processes"):
        _train(train_source, id_tokenizer, global_batch_size=15, process_index=0, process_count=2)


@pytest.mark.parametrize("num_workers,prefetch", [(0, "thread"), (2, "thread"), (2, "process")])
def test_restored_iterator_continues_exactly(train_source, bundled, num_workers, prefetch):
    def fresh(num_workers=num_workers, prefetch=prefetch):
        dataset = _train(train_source, bundled, num_workers=num_workers, prefetch=prefetch)
        return SkipCountingIterator(iter(dataset), max_skipped_fraction=0.0)

    original = fresh()
    before = _take(original, 10)  # crosses the first epoch boundary (12 batches) soon after
    state = json.loads(json.dumps(original.get_state()))  # as a checkpoint stores it
    expected = _take(original, 5)
    restored = fresh()
    restored.set_state(state)
    assert restored.stats.examples == 80
    _assert_same(expected, _take(restored, 5))
    assert restored.get_state() == original.get_state()
    original.close()
    restored.close()
    # Workers (threads or processes) change nothing: the batches are those read inline.
    _assert_same(before + expected, _take(fresh(0, "thread"), 15))


def _png(size):
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (200, 10, 10)).save(buffer, format="PNG")
    return buffer.getvalue()


class _BrokenSource:
    """The real source with some records broken, chosen by their position in the shuffled
    order of seed 0's first epoch (``bad``: position -> reason)."""

    def __init__(self, source, bad):
        self.source = source
        order = stream.Order(len(source), seed=0)
        self.broken = {order.record(p)[1]: reason for p, reason in bad.items()}

    def __len__(self):
        return len(self.source)

    def __getitem__(self, index):
        record = dict(self.source[index])
        reason = self.broken.get(index)
        if reason == "undecodable_image":
            record["image"] = record["image"][:40]  # a PNG cut short
        elif reason == "empty_caption":
            record["captions"] = [b"", b" ", b"\t", b"", b"  "]
        elif reason == "image_too_small":
            record["image"] = _png(8)
        return record


def _bad_positions(n):
    """Every 5th position is bad, cycling through the reasons; the last 8 are good."""
    return {p: SKIP_REASONS[(p // 5) % 3] for p in range(2, n - 8, 5)}


def _bad_reads(source, seed, positions):
    """Reference count of the bad records the stream meets filling ``positions``: the record at
    each position, then its replacements until a good one (``stream.Order``)."""
    order = stream.Order(len(source), seed)
    counts = dict.fromkeys(SKIP_REASONS, 0)
    for position in positions:
        record, attempt = order.record(position)[1], 0
        while record in source.broken:
            counts[source.broken[record]] += 1
            attempt += 1
            record = order.replacement(position, attempt)
    return counts


@pytest.mark.parametrize("num_workers,prefetch", [(0, "thread"), (2, "process")])
def test_bad_records_are_replaced_and_counted(train_source, bundled, num_workers, prefetch):
    bad = _bad_positions(len(train_source))
    source = _BrokenSource(train_source, bad)
    dataset = _train(
        source,
        bundled,
        global_batch_size=1,
        num_epochs=1,
        min_image_size=16,
        num_workers=num_workers,
        prefetch=prefetch,
    )
    iterator = SkipCountingIterator(iter(dataset), max_skipped_fraction=0.5)
    batches = list(iterator)
    assert len(batches) == len(source)  # every position holds one example
    assert all(set(b) == {"image", "tokens"} for b in batches)
    expected = _bad_reads(source, 0, range(len(source)))
    assert all(expected[r] >= sum(1 for v in bad.values() if v == r) > 0 for r in SKIP_REASONS[:3])
    assert iterator.stats.skipped == expected
    assert iterator.stats.examples == len(batches)
    total = sum(expected.values())
    metrics = iterator.stats.metrics()
    assert metrics["data/skipped_records"] == total
    assert metrics["data/skipped_fraction"] == pytest.approx(total / (total + len(source)))
    iterator.close()


def test_skip_counts_survive_a_restore(train_source, bundled):
    source = _BrokenSource(train_source, _bad_positions(len(train_source)))

    def fresh():
        return SkipCountingIterator(
            iter(_train(source, bundled, min_image_size=16)), max_skipped_fraction=0.5
        )

    original = fresh()
    _take(original, 4)
    state = original.get_state()
    assert sum(state["skipped"].values()) > 0
    expected = _take(original, 3)
    restored = fresh()
    restored.set_state(state)
    _assert_same(expected, _take(restored, 3))
    assert restored.stats == original.stats


def test_too_many_bad_records_stop_the_run(train_source, bundled):
    bad = {p: "undecodable_image" for p in range(0, len(train_source), 3)}  # a third
    dataset = _train(_BrokenSource(train_source, bad), bundled)
    iterator = SkipCountingIterator(
        iter(dataset), max_skipped_fraction=0.1, min_records=20, dataset_name="broken_shapes"
    )
    with pytest.raises(TooManySkippedError, match="max_skipped_fraction=10.00%"):
        _take(iterator, 10)
    everything_bad = {p: "empty_caption" for p in range(len(train_source))}
    iterator = iter(_train(_BrokenSource(train_source, everything_bad), bundled))
    with pytest.raises(TooManySkippedError, match=f"{stream.MAX_ATTEMPTS} records in a row"):
        next(iterator)


def test_retrieval_eval_has_every_caption_and_pads_with_a_mask(data_dir, bundled):
    source = sources.open_source(SMALL_NAME, "validation", data_dir)
    dataset = pipeline.eval_dataset(
        source,
        task="retrieval",
        spec=SPEC,
        image_size=64,
        global_batch_size=8,
        tokenizer=bundled,
        max_text_len=24,
        process_index=0,
        process_count=1,
    )
    batches = list(dataset)
    assert len(dataset) == len(batches) == 3  # 20 records in batches of 8
    for batch in batches:
        assert batch["tokens"].shape == (8, 5, 25) and batch["tokens"].dtype == np.int32
        assert batch["caption_mask"].shape == (8, 5) and batch["mask"].shape == (8,)
    masks = np.concatenate([b["mask"] for b in batches])
    np.testing.assert_array_equal(masks, np.arange(24) < 20)
    tokens = np.concatenate([b["tokens"] for b in batches])
    for i in range(20):  # evaluation keeps the source order
        assert [bundled.decode(t) for t in tokens[i]] == [c.decode() for c in source[i]["captions"]]
    assert (tokens[20:] == 0).all()


def test_captioning_eval_gives_reference_texts(data_dir):
    source = sources.open_source(SMALL_NAME, "validation", data_dir)
    dataset = pipeline.eval_dataset(
        source,
        task="captioning",
        spec=SPEC,
        image_size=64,
        global_batch_size=16,
        process_index=0,
        process_count=1,
    )
    batches = list(dataset)
    assert set(batches[0]) == {"image", "captions", "caption_mask", "mask", "index"}
    captions = np.concatenate([b["captions"] for b in batches])
    assert captions.shape == (32, 5)
    assert [list(captions[i]) for i in range(20)] == [
        [c.decode() for c in source[i]["captions"]] for i in range(20)
    ]
    assert (captions[20:] == "").all()


def test_eval_slices_for_two_processes(data_dir, bundled):
    source = sources.open_source(SMALL_NAME, "test", data_dir)  # 40 records
    per_process = []
    for index in range(2):
        dataset = pipeline.eval_dataset(
            source,
            task="classification",
            spec=SPEC,
            image_size=64,
            global_batch_size=12,
            process_index=index,
            process_count=2,
        )
        per_process.append(list(dataset))
    assert len(per_process[0]) == len(per_process[1]) == 4  # 20 each in batches of 6
    labels = []
    for index, batches in enumerate(per_process):
        mask = np.concatenate([b["mask"] for b in batches])
        label = np.concatenate([b["label"] for b in batches])
        assert mask.sum() == 20 and label.dtype == np.int32
        expected = [int(source[i]["label"]) for i in range(index, 40, 2)]
        assert label[mask].tolist() == expected
        positions = np.concatenate([b["index"] for b in batches])
        assert positions[mask].tolist() == list(range(index, 40, 2))  # positions in the split
        assert (positions[~mask] == -1).all()
        labels += expected
    assert len(labels) == 40


def test_validation_eval_masks_bad_records(train_source, bundled):
    bad = {0: "undecodable_image", 1: "empty_caption"}
    source = _BrokenSource(train_source, bad)
    dataset = pipeline.eval_dataset(
        source,
        task="validation",
        spec=SPEC,
        image_size=64,
        global_batch_size=32,
        tokenizer=bundled,
        max_text_len=24,
        process_index=0,
        process_count=1,
    )
    batches = list(dataset)
    mask = np.concatenate([b["mask"] for b in batches])
    tokens = np.concatenate([b["tokens"] for b in batches])
    assert mask.sum() == len(source) - 2
    assert (tokens[~mask] == 0).all()
    first_captions = [source[i]["captions"][0].decode() for i in range(len(source))]
    assert [bundled.decode(t) for t in tokens[mask]] == [
        c for i, c in enumerate(first_captions) if mask[i]
    ]


def test_eval_dataset_from_the_config(data_dir):
    config = tiny_config(data_dir)
    dataset = pipeline.make_eval_dataset(config, "retrieval", batch_size=8)
    assert len(dataset) == 3  # the validation split: 20 records
    test = pipeline.make_eval_dataset(config, "classification", split="test", batch_size=8)
    assert len(test) == 5 and next(iter(test))["label"].shape == (8,)


def test_vocab_larger_than_the_model_is_refused(data_dir):
    config = tiny_config(data_dir)
    config.model.vocab_size = 100
    with pytest.raises(ValueError, match="config.model.vocab_size is 100"):
        pipeline.make_train_iterator(config)


def test_unknown_dataset_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="prepare local"):
        sources.open_source("my_pairs", "train", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="tfds build coco_captions"):
        sources.open_source("coco_captions", "test", str(tmp_path))


def test_data_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv(sources.DATA_DIR_ENV, str(tmp_path))
    assert sources.resolve_data_dir(None) == str(tmp_path)
    assert sources.resolve_data_dir("/explicit") == "/explicit"
    monkeypatch.delenv(sources.DATA_DIR_ENV)
    assert sources.resolve_data_dir(None).endswith("tensorflow_datasets")


def _mesh():
    return jax.make_mesh((2, 4, 1), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)


def test_global_batch_is_sharded_over_data_and_fsdp(train_source, bundled):
    assert jax.device_count() == 8  # tests/conftest.py
    host = next(iter(_train(train_source, bundled, global_batch_size=16)))
    global_batch = pipeline.make_global_batch(host, _mesh())
    for key, array in global_batch.items():
        assert array.shape == host[key].shape
        assert array.sharding.spec == PartitionSpec(("data", "fsdp"))
        assert len(array.addressable_shards) == 8
        assert array.addressable_shards[0].data.shape[0] == 2
        assert array.dtype == host[key].dtype  # images stay uint8 on the wire and on device
        np.testing.assert_array_equal(np.asarray(array), host[key])
    assert global_batch["image"].dtype == np.uint8


def test_global_batch_errors():
    with pytest.raises(ValueError, match="multiple of 8"):
        pipeline.make_global_batch({"image": np.zeros((4, 2))}, _mesh())
    with pytest.raises(ValueError, match="scalar"):
        pipeline.make_global_batch({"step": np.int32(1)}, _mesh())
    with pytest.raises(ValueError, match="multiple of 4"):
        pipeline.per_process_batch_size(30, 4)
    with pytest.raises(ValueError, match="bad process slice"):
        pipeline.process_slice(2, 2)
    assert pipeline.process_slice() == (0, 1)


def test_split_sizes_match_the_small_build(train_source, data_dir):
    assert len(train_source) == SMALL.num_train
    assert pipeline.num_train_examples(tiny_config(data_dir)) == SMALL.num_train
