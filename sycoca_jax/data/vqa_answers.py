"""VQA answers: normalisation, the answer vocabulary, and how right a predicted answer is.

Accuracy of a predicted answer ``a`` for a question with ``n`` human answers, ``m`` of which equal
``a`` after normalisation (Antol et al. 2015):

* ``simple``: ``min(m / 3, 1)``: the formula as usually quoted;
* ``vqav2`` (the default): the official evaluation's version, the mean of ``simple`` over the
  ``n`` leave-one-out subsets of the answers (10 choose 9 for VQAv2):
  ``(m·min((m-1)/3, 1) + (n-m)·min(m/3, 1)) / n``, i.e. 0, 0.3, 0.6, 0.9, 1 for m = 0..4 of 10.

A question with a single reference answer (the embedded ``sycoca_shapes`` has one generated answer
per question) counts as if every annotator had given it: its accuracy is exact match (1 or 0) in
both modes. The normalisation is a light version of the official one (see ``normalize_answer``);
references and the answer vocabulary go through the same function, so they always agree.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import re
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

ACCURACY_MODES = ("vqav2", "simple")
_NUMBERS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_ARTICLES = frozenset(("a", "an", "the"))
_IN_NUMBER_COMMA = re.compile(r"(?<=\d),(?=\d)")
_NON_DECIMAL_PERIOD = re.compile(r"(?<!\d)\.|\.(?!\d)")
_PUNCTUATION = re.compile(r"[;/\[\]\"{}()=+\\_\-><@`,?!*#%^&$~|:]")


def normalize_answer(text: str) -> str:
    """Lowercase; drop apostrophes, commas inside numbers and periods outside decimals; other
    punctuation becomes a space; number words become digits; articles go; spaces collapse.

    ``"Two"`` -> ``"2"``, ``"the T-shirt!"`` -> ``"t shirt"``, ``"1,000"`` -> ``"1000"``.
    """
    text = text.lower().replace("'", "")
    text = _IN_NUMBER_COMMA.sub("", text)
    text = _NON_DECIMAL_PERIOD.sub("", text)
    text = _PUNCTUATION.sub(" ", text)
    words = [_NUMBERS.get(w, w) for w in text.split() if w not in _ARTICLES]
    return " ".join(words)


def _check_mode(mode: str) -> None:
    if mode not in ACCURACY_MODES:
        raise ValueError(f"VQA accuracy mode must be one of {ACCURACY_MODES}, got {mode!r}")


def answer_scores(human_answers: Sequence[str], mode: str = "vqav2") -> dict[str, float]:
    """Accuracy of every distinct (normalised) human answer; any other answer scores 0.

    Empty answers are ignored; with no answer left the dict is empty.
    """
    _check_mode(mode)
    answers = [a for a in (normalize_answer(h) for h in human_answers) if a]
    n = len(answers)
    counts = collections.Counter(answers)
    if n == 1:  # one reference: exact match (see the module docstring)
        return {answers[0]: 1.0}
    if mode == "simple":
        return {a: min(m / 3, 1.0) for a, m in counts.items()}
    return {
        a: (m * min((m - 1) / 3, 1.0) + (n - m) * min(m / 3, 1.0)) / n for a, m in counts.items()
    }


def vqa_accuracy(prediction: str, human_answers: Sequence[str], mode: str = "vqav2") -> float:
    """How right ``prediction`` is for one question (see the module docstring)."""
    return answer_scores(human_answers, mode).get(normalize_answer(prediction), 0.0)


@dataclasses.dataclass(frozen=True)
class AnswerVocab:
    """The classifier's answers: the most frequent normalised answers of the training split
    (CoCa: 3,129 for VQAv2), most frequent first."""

    answers: tuple[str, ...]

    def __post_init__(self):
        if not self.answers:
            raise ValueError("the answer vocabulary is empty: the training split has no answers")
        if len(set(self.answers)) != len(self.answers):
            raise ValueError("the answer vocabulary has duplicate answers")

    def __len__(self) -> int:
        return len(self.answers)

    def index(self) -> dict[str, int]:
        return {a: i for i, a in enumerate(self.answers)}

    @classmethod
    def from_counts(cls, counts: Mapping[str, int], size: int) -> AnswerVocab:
        """The ``size`` most frequent answers (ties broken alphabetically, so it is stable)."""
        ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
        return cls(tuple(a for a, _ in ranked[:size]))

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump({"answers": list(self.answers)}, f, indent=1)

    @classmethod
    def load(cls, path: str) -> AnswerVocab:
        with open(path) as f:
            return cls(tuple(json.load(f)["answers"]))


def count_answers(
    questions_and_answers: Iterable[Sequence[tuple[str, Sequence[str]]]],
) -> tuple[collections.Counter, list[collections.Counter]]:
    """Counts normalised human answers over records (each a list of ``(question, answers)``):
    overall, and per question slot (the question's position in its record)."""
    total: collections.Counter = collections.Counter()
    per_slot: list[collections.Counter] = []
    for record in questions_and_answers:
        for slot, (_, answers) in enumerate(record):
            while len(per_slot) <= slot:
                per_slot.append(collections.Counter())
            normalised = [a for a in (normalize_answer(h) for h in answers) if a]
            total.update(normalised)
            per_slot[slot].update(normalised)
    return total, per_slot


def answer_targets(
    human_answers: Sequence[str], vocab_index: Mapping[str, int], max_answers: int, mode: str
) -> tuple[np.ndarray, np.ndarray, str]:
    """A question's candidates as arrays: ``ids`` (max_answers,) int32, the vocabulary index of
    each distinct human answer (-1: outside the vocabulary, or padding), ``scores`` (max_answers,)
    float32 their accuracies (0 for padding), and the best answer's text ("" if none).

    Candidates are kept best first; ``max_answers`` >= the number of human answers keeps them all.
    """
    scores = answer_scores(human_answers, mode)
    ranked = sorted(scores.items(), key=lambda item: (-item[1], item[0]))[:max_answers]
    ids = np.full((max_answers,), -1, np.int32)
    values = np.zeros((max_answers,), np.float32)
    for i, (answer, score) in enumerate(ranked):
        ids[i] = vocab_index.get(answer, -1)
        values[i] = score
    return ids, values, ranked[0][0] if ranked else ""
