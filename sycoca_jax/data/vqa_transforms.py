"""VQA's per-record step: questions tokenised, human answers as vocabulary targets (a grain
transform in the manner of ``transforms``; the VQA pipelines are in ``task_pipelines``)."""

from __future__ import annotations

import numpy as np

from sycoca_jax.data import vqa_answers
from sycoca_jax.data.skipping import BadRecord
from sycoca_jax.data.sources import DatasetSpec
from sycoca_jax.data.tokenizer import Tokenizer
from sycoca_jax.data.transforms import Record, RecordMap


class VQAQuestions(RecordMap):
    """A VQA record's first ``max_questions`` questions -> ``tokens`` ``(Q, max_text_len + 1)``,
    ``question_mask`` ``(Q,)`` (False for rows of pad when an image has fewer questions), and per
    question its distinct human answers as ``answer_ids`` ``(Q, A)`` (answer-vocabulary index, -1
    outside it or padding) with their accuracies ``answer_scores`` ``(Q, A)``
    (``vqa_answers.answer_scores``). With ``qa_tokens``, also ``qa_tokens`` ``(Q, L + 1)``: each
    question followed by its best answer, for co-training the captioning loss.

    A record without questions is bad (counted as ``empty_caption``: it has no text to train on).
    """

    def __init__(
        self,
        spec: DatasetSpec,
        tokenizer: Tokenizer,
        max_text_len: int,
        max_questions: int,
        vocab_index: dict[str, int],
        max_answers: int,
        accuracy: str = "vqav2",
        qa_tokens: bool = False,
    ):
        self.spec, self.tokenizer, self.max_text_len = spec, tokenizer, max_text_len
        self.max_questions, self.max_answers = max_questions, max_answers
        self.vocab_index, self.accuracy, self.qa_tokens = dict(vocab_index), accuracy, qa_tokens

    def apply(self, record: Record) -> Record:
        pairs = [(q, a) for q, a in self.spec.questions_and_answers(record) if q.strip()]
        pairs = pairs[: self.max_questions]
        if not pairs:
            raise BadRecord("empty_caption", "no question")
        q, a, length = self.max_questions, self.max_answers, self.max_text_len + 1
        out = {
            "tokens": np.zeros((q, length), np.int32),
            "question_mask": np.arange(q) < len(pairs),
            "answer_ids": np.full((q, a), -1, np.int32),
            "answer_scores": np.zeros((q, a), np.float32),
        }
        if self.qa_tokens:
            out["qa_tokens"] = np.zeros((q, length), np.int32)
        for i, (question, answers) in enumerate(pairs):
            out["tokens"][i] = self.tokenizer.tokenize(question, self.max_text_len)
            ids, scores, best = vqa_answers.answer_targets(
                answers, self.vocab_index, a, self.accuracy
            )
            out["answer_ids"][i], out["answer_scores"][i] = ids, scores
            if self.qa_tokens:
                text = f"{question} {best}".strip()
                out["qa_tokens"][i] = self.tokenizer.tokenize(text, self.max_text_len)
        return {**record, **out}
