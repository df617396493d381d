"""The VQA converter (JSONL and official VQAv2 files) and the VQA pipelines reading its output."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from sycoca_jax.data import (
    converter,
    prepare,
    sources,
    task_pipelines,
    vqa_answers,
    vqa_converter,
)
from sycoca_jax.data.tokenizer import load_tokenizer


def _image(path, size=40, colour=(200, 30, 30)):
    Image.new("RGB", (size, size), colour).save(path)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("vqa_raw")
    (root / "images").mkdir()
    _image(root / "images" / "a.png")
    _image(root / "images" / "b.png", colour=(30, 30, 200))
    _image(root / "images" / "tiny.png", size=8)
    rows = [
        {"image": "images/a.png", "question": "what colour?", "answers": ["red"] * 9 + ["pink"]},
        {"image": "images/b.png", "question": "what colour?", "answer": "blue"},
        {"image": "images/a.png", "question": "how many?", "answers": ["1", "one", "2"]},
        {"image": "images/a.png", "question": "", "answers": ["x"]},
        {"image": "images/missing.png", "question": "what?", "answers": ["y"]},
        {"image": "images/tiny.png", "question": "what?", "answers": ["z"]},
    ]
    train = root / "train.jsonl"
    train.write_text("\n".join(json.dumps(r) for r in rows) + "\nnot json\n")
    questions = {
        "data_subtype": "val2014",
        "questions": [{"image_id": 7, "question": "is it red?", "question_id": 70}],
    }
    annotations = {"annotations": [{"question_id": 70, "answers": [{"answer": "yes"}] * 10}]}
    (root / "q.json").write_text(json.dumps(questions))
    (root / "a.json").write_text(json.dumps(annotations))
    (root / "val2014").mkdir()
    _image(root / "val2014" / "COCO_val2014_000000000007.jpg")
    data_dir = str(tmp_path_factory.mktemp("vqa_tfds"))
    args = prepare.parser().parse_args(
        [
            "vqa",
            f"--source={train}",
            f"--official=validation={root / 'q.json'},{root / 'a.json'},{root / 'val2014'}",
            "--name=tiny_vqa",
            f"--data_dir={data_dir}",
            "--num_workers=0",
        ]
    )
    return prepare.run_vqa(args), data_dir


def test_conversion_groups_questions_by_image_and_counts_what_it_skips(converted):
    summary, data_dir = converted
    assert summary["splits"]["train"] == {
        "written": 2,
        "skipped": {
            "empty_question": 1,
            "image_too_small": 1,
            "missing_image": 1,
            "unreadable_row": 1,
        },
    }
    assert summary["splits"]["validation"]["written"] == 1
    spec = sources.dataset_spec("tiny_vqa")
    train = sources.open_source("tiny_vqa", "train", data_dir)
    records = {  # TFDS orders records by a hash of their key (the image path)
        os.path.basename(r["key"].decode()): spec.questions_and_answers(r)
        for r in train.__getitems__([0, 1])
    }
    assert records == {
        "a.png": [("what colour?", ["red"] * 9 + ["pink"]), ("how many?", ["1", "one", "2"])],
        "b.png": [("what colour?", ["blue"])],
    }
    validation = sources.open_source("tiny_vqa", "validation", data_dir)
    assert spec.questions_and_answers(validation[0]) == [("is it red?", ["yes"] * 10)]
    with open(f"{data_dir}/tiny_vqa/1.0.0/{converter.SUMMARY_FILE}") as f:
        assert json.load(f) == summary


def test_a_missing_source_or_a_second_build_is_refused_before_writing(converted, tmp_path):
    """The builder's own ``check_sources`` (the official triple is three paths) runs first;
    an existing build is never overwritten."""
    _, data_dir = converted
    q = tmp_path / "q.json"
    q.write_text("{}")
    missing = str(tmp_path / "annotations.json")
    with pytest.raises(FileNotFoundError, match="VQA source .*annotations.json.* does not exist"):
        vqa_converter.convert_vqa(
            {"validation": (str(q), missing, str(tmp_path))}, name="other", data_dir=str(tmp_path)
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.json"]
    with pytest.raises(FileExistsError, match="already exists"):
        vqa_converter.convert_vqa({"train": missing}, name="tiny_vqa", data_dir=data_dir)


def test_vqa_pipelines_on_converted_data(converted):
    _, data_dir = converted
    spec = sources.dataset_spec("tiny_vqa")
    train = sources.open_source("tiny_vqa", "train", data_dir)
    total, per_slot = task_pipelines.count_vqa_answers(train, spec)
    assert total["red"] == 9 and total["1"] == 2 and per_slot[1] == {"1": 2, "2": 1}
    vocab = vqa_answers.AnswerVocab.from_counts(total, size=3)
    assert vocab.answers == ("red", "1", "2")
    options = dict(
        spec=spec,
        tokenizer=load_tokenizer(None),
        vocab=vocab,
        image_size=32,
        max_text_len=12,
        max_questions=2,
        max_answers=10,
    )
    batch = next(iter(task_pipelines.vqa_eval_dataset(train, global_batch_size=4, **options)))
    assert batch["image"].shape == (4, 32, 32, 3) and batch["tokens"].shape == (4, 2, 13)
    assert batch["mask"].tolist() == [True, True, False, False]
    a, b = (0, 1) if batch["question_mask"][0].all() else (1, 0)  # a.png has two questions
    assert batch["question_mask"][[a, b]].tolist() == [[True, True], [True, False]]
    assert not batch["question_mask"][2:].any()
    np.testing.assert_allclose(batch["answer_scores"][a, 0, :2], [1.0, 0.3])  # red 9, pink 1
    assert batch["answer_ids"][a, 0, :2].tolist() == [0, -1]
    assert batch["answer_ids"][a, 1, :2].tolist() == [1, 2]  # "1" twice, then "2"
    assert batch["answer_ids"][b, 0, 0] == -1  # "blue" is not among the 3 answers kept
    training = task_pipelines.vqa_train_dataset(
        train, global_batch_size=2, qa_tokens=True, process_index=0, process_count=1, **options
    )
    first = next(iter(training))
    assert first["qa_tokens"].shape == (2, 2, 13) and first["answer_ids"].shape == (2, 2, 10)
