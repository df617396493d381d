"""Tokenizer: fixed special ids, layout, truncation, round trips, the bundled model, the CLI."""

from __future__ import annotations

import io
import pickle

import numpy as np
import pytest
import sentencepiece as spm

from sycoca_jax.data import shapes, shapes_builder, sources, tokenizer
from sycoca_jax.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID
from sycoca_jax.models.text import caption_input_and_target
from tests.helpers import SMALL_NAME


@pytest.fixture(scope="module")
def bundled():
    return tokenizer.load_tokenizer(None, "sycoca_shapes")


def test_special_ids_of_the_bundled_model(bundled):
    assert (PAD_ID, BOS_ID, EOS_ID, UNK_ID) == (0, 1, 2, 3)
    assert [bundled.id_to_piece(i) for i in range(4)] == ["<pad>", "<s>", "</s>", "<unk>"]
    assert bundled.vocab_size <= 512  # the tiny config's vocab_size


def test_layout_and_truncation(bundled):
    ids = bundled.encode("a red circle")
    tokens = bundled.tokenize("a red circle", max_text_len=8)
    assert tokens.dtype == np.int32 and tokens.shape == (9,)
    np.testing.assert_array_equal(tokens, [BOS_ID, *ids, EOS_ID] + [PAD_ID] * (7 - len(ids)))
    long = " ".join(["a red circle"] * 10)
    long_ids = bundled.encode(long)
    truncated = bundled.tokenize(long, max_text_len=8)
    np.testing.assert_array_equal(truncated, [BOS_ID, *long_ids[:7], EOS_ID])
    exact = bundled.tokenize_ids(list(range(10, 17)), 8)  # exactly max_text_len - 1
    np.testing.assert_array_equal(exact, [BOS_ID, *range(10, 17), EOS_ID])


def test_caption_shift_on_a_known_sentence(bundled):
    sentence = "a red circle above a blue square"
    tokens = bundled.tokenize_batch([sentence], max_text_len=24)
    words = [bundled.encode(w)[0] for w in sentence.split()]  # one piece per word here
    assert bundled.encode(sentence) == words
    inputs, targets = caption_input_and_target(tokens)
    assert inputs.shape == targets.shape == (1, 24)
    np.testing.assert_array_equal(inputs[0, :9], [BOS_ID, *words, EOS_ID])
    # The target at position t is the input at t + 1: first word after bos, eos after the last.
    np.testing.assert_array_equal(targets[0, :9], [*words, EOS_ID, PAD_ID])
    assert bundled.decode(targets[0]) == sentence


def test_round_trip_and_no_unknown_pieces_on_every_text(bundled, data_dir):
    texts = []
    for split in ("train", "validation", "test"):  # test holds the held-out combinations
        texts += sources.dataset_texts(SMALL_NAME, split, data_dir)
    assert len(texts) > 1000
    for text in texts:
        ids = bundled.encode(text)
        assert UNK_ID not in ids, text
        assert len(ids) <= 23, text  # fits max_text_len=24 with bos and eos, untruncated
        assert bundled.decode(bundled.tokenize(text, 24)) == text


def test_bundled_model_is_what_the_training_command_produces(bundled):
    # `tokenizer train --dataset=sycoca_shapes` reads the default build's train split, whose
    # texts are exactly these generated ones; training sorts them, so order does not matter.
    config = shapes_builder.shapes_config()
    texts = []
    for index in range(config.num_train):
        example = shapes.make_example(
            config.seed, "train", index, shapes_builder.COMPOSITIONAL_FRACTION
        )
        texts += [*example.captions, *example.questions, *example.answers]
    retrained = tokenizer.train_tokenizer(
        texts, vocab_size=512, model_type="bpe", character_coverage=1.0
    )
    assert retrained.model_proto == bundled.model_proto


def test_pickles_by_value(bundled):
    clone = pickle.loads(pickle.dumps(bundled))
    assert clone.encode("a green star") == bundled.encode("a green star")


def _spm_model(**ids) -> bytes:
    model = io.BytesIO()
    sentences = [f"the {c} {k} is here" for c in shapes.COLOURS for k in shapes.KINDS] * 5
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model,
        vocab_size=60,
        hard_vocab_limit=False,
        minloglevel=2,
        **ids,
    )
    return model.getvalue()


def test_user_model_with_other_special_ids_is_remapped():
    # T5-style: pad 0, eos 1, unk 2 and no bos.
    user = tokenizer.Tokenizer(_spm_model(pad_id=0, eos_id=1, unk_id=2, bos_id=-1))
    raw = spm.SentencePieceProcessor(model_proto=user.model_proto)
    assert user.vocab_size == raw.get_piece_size() + 1  # bos added
    tokens = user.tokenize("the red star is here", 24)
    assert tokens[0] == BOS_ID and EOS_ID in tokens and tokens[-1] == PAD_ID
    assert set(tokens[1 : list(tokens).index(EOS_ID)]).isdisjoint({PAD_ID, BOS_ID, EOS_ID})
    assert user.decode(tokens) == "the red star is here"
    assert user.encode("zzz").count(UNK_ID) >= 1


def test_user_model_without_pad_is_refused():
    with pytest.raises(ValueError, match="no pad piece"):
        tokenizer.Tokenizer(_spm_model(pad_id=-1, bos_id=1, eos_id=2, unk_id=0))


def test_missing_tokenizer_for_a_dataset_without_bundled_one():
    with pytest.raises(ValueError, match="tokenizer train --dataset=cc3m"):
        tokenizer.load_tokenizer(None, "cc3m")
    with pytest.raises(FileNotFoundError):
        tokenizer.load_tokenizer("/nonexistent/model.model")


def test_cli_trains_from_a_dataset(tmp_path, data_dir, bundled):
    output = tmp_path / "shapes_small.model"
    tokenizer.main(
        [
            "train",
            f"--dataset={SMALL_NAME}",
            f"--data_dir={data_dir}",
            "--vocab_size=512",
            "--model_type=bpe",
            "--character_coverage=1.0",
            f"--output={output}",
        ]
    )
    trained = tokenizer.load_tokenizer(str(output))
    assert trained.vocab_size <= 512
    sentence = "a large red circle at top left"
    assert trained.decode(trained.tokenize(sentence, 24)) == sentence
