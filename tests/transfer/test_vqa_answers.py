"""The VQA accuracy formula on hand-made cases with known answers, answer normalisation, the
answer vocabulary, and the array path the trainer and evaluator use."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from sycoca_jax.data import sources, vqa_answers, vqa_transforms
from sycoca_jax.data.tokenizer import load_tokenizer
from sycoca_jax.data.vqa_answers import answer_scores, normalize_answer, vqa_accuracy
from sycoca_jax.transfer import vqa


def ten(matching: str, m: int, other: str = "cat") -> list[str]:
    """Ten human answers, ``m`` of them ``matching``."""
    return [matching] * m + [other] * (10 - m)


@pytest.mark.parametrize(
    "m, simple, official",
    [(0, 0.0, 0.0), (1, 1 / 3, 0.3), (2, 2 / 3, 0.6), (3, 1.0, 0.9), (4, 1.0, 1.0), (10, 1.0, 1.0)],
)
def test_accuracy_of_m_matching_answers_out_of_ten(m, simple, official):
    answers = ten("dog", m)
    assert vqa_accuracy("dog", answers, "simple") == pytest.approx(simple)
    assert vqa_accuracy("dog", answers, "vqav2") == pytest.approx(official)
    assert vqa_accuracy("dog", answers) == pytest.approx(official)  # the default is VQAv2's


def test_official_accuracy_is_the_mean_over_leave_one_out_subsets():
    answers = ["2", "2", "two", "3", "3", "3", "3", "4", "yes", "2"]  # "two" normalises to "2"
    for prediction in ("2", "3", "4", "5"):
        subsets = [answers[:i] + answers[i + 1 :] for i in range(10)]
        expected = np.mean([vqa_accuracy(prediction, s, "simple") for s in subsets])
        assert vqa_accuracy(prediction, answers) == pytest.approx(expected)
    assert vqa_accuracy("Two", answers) == pytest.approx(1.0)  # 4 of 10 say 2
    assert vqa_accuracy("3", answers) == pytest.approx(1.0)
    assert vqa_accuracy("4", answers) == pytest.approx(0.3)


def test_a_single_reference_answer_scores_exact_match():
    for mode in vqa_answers.ACCURACY_MODES:
        assert vqa_accuracy("red", ["red"], mode) == 1.0
        assert vqa_accuracy("blue", ["red"], mode) == 0.0
    assert answer_scores([]) == {}
    with pytest.raises(ValueError, match="accuracy mode"):
        vqa_accuracy("a", ["a"], "strict")


def test_normalisation():
    assert normalize_answer("Two") == "2"
    assert normalize_answer("  The T-shirt! ") == "t shirt"
    assert normalize_answer("1,000") == "1000"
    assert normalize_answer("3.5") == "3.5"
    assert normalize_answer("yes.") == "yes"
    assert normalize_answer("top left") == "top left"
    assert normalize_answer("don't") == "dont"


def test_vocabulary_ranks_by_count_then_alphabetically(tmp_path):
    vocab = vqa_answers.AnswerVocab.from_counts({"b": 3, "a": 3, "c": 5, "d": 1}, size=3)
    assert vocab.answers == ("c", "a", "b")
    path = str(tmp_path / "vocab.json")
    vocab.save(path)
    assert vqa_answers.AnswerVocab.load(path) == vocab
    with pytest.raises(ValueError, match="empty"):
        vqa_answers.AnswerVocab(())


def test_counts_per_slot():
    records = [[("q1", ["Red"]), ("q2", ["two"])], [("q1", ["red"]), ("q2", ["3", "3"])]]
    total, per_slot = vqa_answers.count_answers(records)
    assert total == {"red": 2, "2": 1, "3": 2}
    assert per_slot[0] == {"red": 2} and per_slot[1] == {"2": 1, "3": 2}


def test_targets_and_the_array_path_agree_with_the_formula():
    vocab = {"dog": 0, "cat": 1, "2": 2}
    human = ten("dog", 2, other="cat")[:9] + ["fish"]  # dog 2, cat 7, fish 1 (not in vocab)
    ids, scores, best = vqa_answers.answer_targets(human, vocab, max_answers=4, mode="vqav2")
    assert best == "cat"
    assert ids.tolist() == [1, 0, -1, -1]  # best first; fish is outside the vocabulary
    assert scores.tolist() == pytest.approx([1.0, 0.6, 0.3, 0.0])
    for index, answer in enumerate(("dog", "cat", "2")):
        got = vqa.prediction_scores(np.array([index]), ids[None], scores[None])[0]
        assert got == pytest.approx(vqa_accuracy(answer, human))
        on_device = vqa.prediction_scores(jnp.array([index]), jnp.array(ids[None]), scores[None])
        assert float(on_device[0]) == pytest.approx(vqa_accuracy(answer, human))
    target = np.asarray(vqa.soft_targets(jnp.array(ids[None]), jnp.array(scores[None]), 3))
    assert target[0].tolist() == pytest.approx([0.6, 1.0, 0.0])  # fish dropped, not wrapped


def test_evaluation_averages_asked_questions_and_reports_slots():
    ids = np.array([[[0], [1]], [[0], [-1]]])  # 2 images x 2 questions x 1 answer
    scores = np.ones(ids.shape, np.float32)
    asked = np.array([[True, True], [True, False]])
    prediction = np.array([[0, 0], [0, 1]])
    out = vqa.evaluate_predictions(prediction, ids, scores, asked, ("colour", "kind"))
    assert out["accuracy"] == pytest.approx(2 / 3) and out["questions"] == 3
    assert out["by_slot"] == {"colour": 1.0, "kind": 0.0}


def test_converter_layout_and_the_vqa_transform():
    spec = sources.DatasetSpec()
    record = {
        "image": b"",
        "questions": [b"what is it?", b"how many?"],
        "answers": [b"dog", b"dog", b"cat", b"2"],
        "answer_counts": np.array([3, 1]),
    }
    assert spec.questions_and_answers(record) == [
        ("what is it?", ["dog", "dog", "cat"]),
        ("how many?", ["2"]),
    ]
    tokenizer = load_tokenizer(None)
    step = vqa_transforms.VQAQuestions(
        spec,
        tokenizer,
        24,
        max_questions=3,
        vocab_index={"dog": 0, "2": 1},
        max_answers=3,
        accuracy="simple",
        qa_tokens=True,
    )
    out = step.map(record)
    assert out["tokens"].shape == (3, 25) and out["qa_tokens"].shape == (3, 25)
    assert out["question_mask"].tolist() == [True, True, False]
    assert out["answer_ids"].tolist() == [[0, -1, -1], [1, -1, -1], [-1, -1, -1]]
    np.testing.assert_allclose(out["answer_scores"][0], [2 / 3, 1 / 3, 0.0], rtol=1e-6)
    assert tokenizer.decode(out["qa_tokens"][0]) == "what is it? dog"
    assert (out["tokens"][2] == 0).all()
    bad = dict(record, answer_counts=np.array([1, 1]))
    with pytest.raises(ValueError, match="do not line up"):
        spec.questions_and_answers(bad)
