"""VQA fine-tuning as CoCa does it (App. A/B): the image through the image encoder (and the
captioning pooler that feeds the decoder), the question through the unimodal text decoder and
the multimodal decoder cross-attending to the image tokens; a new single-query attentional pooler
over the decoder's token states and a linear classifier over the answer vocabulary (the
``vqa.answer_vocab_size`` most frequent training answers; CoCa: 3,129 for VQAv2).

Loss: softmax cross-entropy against each question's answer distribution (its human answers'
VQA accuracies, normalised; a single reference answer gives a one-hot target), over questions with
at least one answer in the vocabulary; plus ``vqa.caption_weight`` × the captioning loss on
"question answer" texts (CoCa's optional co-training; 0 turns it off). Reported: VQA accuracy
(``sycoca_jax.data.vqa_answers``) per evaluation split, per question slot when
``vqa.slot_names`` names them, and answer-prior baselines.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from sycoca_jax import losses, workdir_lock
from sycoca_jax.data import task_pipelines, vqa_answers
from sycoca_jax.transfer import heads, inputs, results, towers, trainer

VOCAB_FILE = "answer_vocab.json"


def soft_targets(answer_ids: jax.Array, answer_scores: jax.Array, num_answers: int) -> jax.Array:
    """(N, A) candidate ids (-1: none) and scores -> (N, num_answers) summed scores."""
    n = answer_ids.shape[0]
    index = jnp.where(answer_ids >= 0, answer_ids, num_answers)  # out of range: dropped
    rows = jnp.broadcast_to(jnp.arange(n)[:, None], index.shape)
    target = jnp.zeros((n, num_answers), jnp.float32)
    return target.at[rows, index].add(answer_scores.astype(jnp.float32), mode="drop")


def prediction_scores(prediction: Any, answer_ids: Any, answer_scores: Any) -> Any:
    """VQA accuracy of predicted vocabulary indices (...,) given candidates (..., A)."""
    xp = jnp if isinstance(prediction, jax.Array) else np
    return xp.sum(xp.where(answer_ids == prediction[..., None], answer_scores, 0.0), axis=-1)


def vqa_task(
    pretrained: towers.Pretrained, num_answers: int, config: ml_collections.ConfigDict
) -> tuple[trainer.HeadTask, Any]:
    """The task (tower = image encoder, captioning pooler, both text decoders) and its
    ``predict(params, batch) -> {"prediction": (B, Q)}``."""
    model = pretrained.model
    if not model.use_captioning:
        raise ValueError(
            f"{pretrained.path} was trained without a captioning head (CLIP objective): VQA "
            "runs the question through the multimodal decoder, which it does not have"
        )
    head = heads.PooledClassifier(
        num_answers,
        width=model.text_width,
        num_heads=config.head.num_heads or model.pooler_heads,
        dtype=model.dtype,
    )
    head_inputs = (
        jax.ShapeDtypeStruct((1, model.max_text_len, model.text_width), jnp.float32),
        jax.ShapeDtypeStruct((1, model.max_text_len), jnp.bool_),
    )
    caption_weight = config.vqa.caption_weight

    def answer_logits(params, batch, with_captions=False):
        out = towers.question_states(
            model,
            params["tower"],
            batch["image"],
            batch["tokens"],
            batch["qa_tokens"] if with_captions else None,
        )
        return head.apply({"params": params["head"]}, out["states"], out["valid"]), out

    def loss_fn(params, batch):
        logits, out = answer_logits(params, batch, with_captions=caption_weight > 0)
        ids = batch["answer_ids"].reshape((logits.shape[0], -1))
        scores = batch["answer_scores"].reshape(ids.shape)
        asked = batch["question_mask"].reshape(-1)
        target = soft_targets(ids, scores, num_answers)
        mass = jnp.sum(target, axis=-1)
        weight = (asked & (mass > 0)).astype(jnp.float32)
        target = target / jnp.maximum(mass, 1e-9)[:, None]
        ce = optax.softmax_cross_entropy(logits, target)
        vqa_loss = jnp.sum(ce * weight) / jnp.maximum(jnp.sum(weight), 1.0)
        accuracy = prediction_scores(jnp.argmax(logits, -1), ids, scores)
        asked_f = asked.astype(jnp.float32)
        metrics = {
            "loss/vqa": vqa_loss,
            "accuracy/vqa": jnp.sum(accuracy * asked_f) / jnp.maximum(jnp.sum(asked_f), 1.0),
        }
        total = vqa_loss
        if caption_weight > 0:
            weights = (out["qa_targets"] != model.pad_id) & asked[:, None]
            ic, ic_accuracy = losses.caption_loss(
                out["qa_logits"], out["qa_targets"], weights.astype(jnp.float32)
            )
            total = total + caption_weight * ic
            metrics.update({"loss/caption": ic, "accuracy/caption": ic_accuracy})
        metrics["loss"] = total
        return total, metrics

    def predict(params, batch):
        logits, _ = answer_logits(params, batch)
        return {"prediction": jnp.argmax(logits, -1).reshape(batch["tokens"].shape[:2])}

    task = trainer.HeadTask(model, towers.VQA_SUBTREES, head, head_inputs, loss_fn)
    return task, predict


def answer_vocabulary(
    config: ml_collections.ConfigDict, train_source: Any, workdir: str
) -> tuple[vqa_answers.AnswerVocab, Any, list[Any]]:
    """The vocabulary (``vqa.answer_vocab`` if set, else the most frequent training answers),
    saved as ``<workdir>/answer_vocab.json``; and the training answer counts (overall, per
    slot) for the baselines."""
    total, per_slot = task_pipelines.count_vqa_answers(train_source, inputs.spec(config))
    if config.vqa.answer_vocab:
        vocab = vqa_answers.AnswerVocab.load(config.vqa.answer_vocab)
    else:
        vocab = vqa_answers.AnswerVocab.from_counts(total, config.vqa.answer_vocab_size)
    covered = sum(total[a] for a in vocab.answers) / max(sum(total.values()), 1)
    logging.info("answer vocabulary: %d answers covering %.1f%% of them", len(vocab), 100 * covered)
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        vocab.save(os.path.join(workdir, VOCAB_FILE))
    return vocab, total, per_slot


def evaluate_predictions(
    prediction: np.ndarray,
    answer_ids: np.ndarray,
    answer_scores: np.ndarray,
    question_mask: np.ndarray,
    slot_names: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Mean VQA accuracy over the asked questions (and per named slot)."""
    scores = prediction_scores(prediction, answer_ids, answer_scores).astype(np.float64)
    asked = question_mask.astype(bool)
    out: dict[str, Any] = {"accuracy": float(scores[asked].mean()), "questions": int(asked.sum())}
    if slot_names:
        out["by_slot"] = {
            name: float(scores[:, j][asked[:, j]].mean())
            for j, name in enumerate(slot_names)
            if j < asked.shape[1] and asked[:, j].any()
        }
    return out


def baselines(
    vocab: vqa_answers.AnswerVocab,
    total: Any,
    per_slot: list[Any],
    answer_ids: np.ndarray,
    answer_scores: np.ndarray,
    question_mask: np.ndarray,
    per_slot_prior: bool,
) -> dict[str, float]:
    """Chance levels: a uniformly random vocabulary answer; always the most frequent training
    answer; (with ``per_slot_prior``, for data whose question slot is its type) the most frequent
    training answer of the question's slot."""
    index = vocab.index()
    asked = question_mask.astype(bool)
    in_vocab = np.where(answer_ids >= 0, answer_scores, 0.0).astype(np.float64).sum(-1)
    out = {"uniform": float(in_vocab[asked].mean() / len(vocab))}
    top = index.get(total.most_common(1)[0][0], -1) if total else -1
    constant = np.full(asked.shape, top)
    out["most_frequent_answer"] = evaluate_predictions(
        constant, answer_ids, answer_scores, question_mask
    )["accuracy"]
    if per_slot_prior:
        slot_top = [index.get(c.most_common(1)[0][0], -1) if c else -1 for c in per_slot]
        slot_top += [-1] * (asked.shape[1] - len(slot_top))
        prior = np.broadcast_to(np.asarray(slot_top[: asked.shape[1]]), asked.shape)
        out["per_slot_prior"] = evaluate_predictions(
            prior, answer_ids, answer_scores, question_mask
        )["accuracy"]
    return out


def run(
    config: ml_collections.ConfigDict,
    workdir: str,
    pretrained: towers.Pretrained,
    lease: workdir_lock.Held | None = None,
) -> dict[str, Any] | None:
    """Trains the VQA model (resuming from ``workdir``); returns the results per evaluation
    split, or None when a stop request (SIGTERM) ended training early."""
    data, vqa = config.data, config.vqa
    tokenizer = inputs.tokenizer_for(config, pretrained)  # a wrong one fails first
    train_source = inputs.open_split(config, data.train_split)
    vocab, total, per_slot = answer_vocabulary(config, train_source, workdir)
    task, predict_fn = vqa_task(pretrained, len(vocab), config)
    setup = trainer.make_setup(config, task, len(train_source))
    text = _text_options(config, pretrained.model, tokenizer, vocab)
    dataset = task_pipelines.vqa_train_dataset(
        train_source,
        global_batch_size=config.batch_size,
        qa_tokens=vqa.caption_weight > 0,
        **text,
        **inputs.loader_options(config),
    )
    batches = inputs.train_iterator(dataset, config)
    outcome = trainer.train_head(setup, workdir, batches, pretrained, lease)
    if outcome.stopped:
        return None
    splits = {}
    for split in data.eval_splits:
        out = _predict_split(setup, predict_fn, outcome.state["params"], split, text)
        candidates = (out["answer_ids"], out["answer_scores"], out["question_mask"])
        splits[split] = {
            **evaluate_predictions(out["prediction"], *candidates, tuple(vqa.slot_names)),
            "chance": baselines(vocab, total, per_slot, *candidates, bool(vqa.slot_names)),
        }
    accuracy = {f"{split}/vqa_accuracy": numbers["accuracy"] for split, numbers in splits.items()}
    results.write_metrics(workdir, setup.total_steps, accuracy)
    summary = {
        "answer_vocab_size": len(vocab),
        "accuracy_mode": vqa.accuracy,
        "steps": setup.total_steps,
        "train": outcome.metrics,
    }
    return {**summary, "splits": splits}


def _text_options(
    config: ml_collections.ConfigDict, model: Any, tokenizer: Any, vocab: Any
) -> dict[str, Any]:
    """The VQA pipelines' options that training and evaluation share."""
    vqa = config.vqa
    return dict(
        spec=inputs.spec(config),
        tokenizer=tokenizer,
        vocab=vocab,
        image_size=model.image_size,
        max_text_len=model.max_text_len,
        max_questions=vqa.max_questions,
        max_answers=vqa.max_answers,
        accuracy=vqa.accuracy,
    )


def _predict_split(
    setup: trainer.HeadSetup, predict_fn: Any, params: Any, split: str, text: dict[str, Any]
) -> dict[str, np.ndarray]:
    """Predicted answers of ``split`` with the candidates that score them."""
    config = setup.config
    eval_data = task_pipelines.vqa_eval_dataset(
        inputs.open_split(config, split),
        global_batch_size=config.eval_batch_size,
        min_image_size=config.data.min_image_size,
        **text,
    )
    keep = ["answer_ids", "answer_scores", "question_mask"]
    return trainer.predict(
        setup.placement,
        predict_fn,
        params,
        eval_data,
        ["image", "tokens"],
        keep,
        inputs.eval_threads(config),
    )
