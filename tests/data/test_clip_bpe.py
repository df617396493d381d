"""CLIP's BPE tokenizer against open_clip's own ids (recorded in the fixture by
``tests/fixtures/open_clip/make_fixtures.py``), and its place behind the common interface.

The vocabulary file comes from the installed open_clip package (CI installs ``open_clip_torch``
with ``--no-deps`` for exactly this; neither torch nor open_clip is imported). Without it these
tests fail, saying how to install it."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest

from sycoca_jax.data import clip_bpe
from sycoca_jax.data.tokenizer import SpecialIds, check_model_fits, load_tokenizer
from tests.interop import golden


@pytest.fixture(scope="module")
def tokenizer():
    try:
        path = clip_bpe.installed_vocab_path()
    except FileNotFoundError as e:
        pytest.fail(f"{e} (CI: .ci/run installs it)", pytrace=False)
    return clip_bpe.ClipBpeTokenizer.from_reference(f"clip_bpe:{path}")


@pytest.fixture(scope="module")
def reference():
    return json.loads((golden.DIRECTORY / "clip_bpe_ids.json").read_text(encoding="utf-8"))


def test_ids_equal_open_clips_on_varied_captions(tokenizer, reference):
    """300 captions: unicode (accents, CJK, emoji, mojibake, ligatures, full width), HTML
    entities, punctuation, odd whitespace, empty text, the literal special markers and long texts
    truncated with the end token; open_clip's ``tokenize(context_length=77)`` is our
    ``tokenize(max_text_len=76)``."""
    length = reference["context_length"]
    assert len(reference["captions"]) >= 300
    assert sum(len(ids) == length for ids in reference["ids"]) >= 30  # truncated ones
    mismatched = []
    for text, ids in zip(reference["captions"], reference["ids"], strict=True):
        want = np.zeros(length, np.int32)
        want[: len(ids)] = ids
        if not np.array_equal(tokenizer.tokenize(text, length - 1), want):
            mismatched.append(text)
    assert not mismatched, mismatched


def test_special_ids_and_layout(tokenizer):
    assert tokenizer.special_ids == SpecialIds(pad=0, bos=49406, eos=49407)
    assert tokenizer.vocab_size == 49408
    tokens = tokenizer.tokenize("a photo of a cat", 8)
    np.testing.assert_array_equal(tokens, [49406, 320, 1125, 539, 320, 2368, 49407, 0, 0])
    long = tokenizer.tokenize(" ".join(["cat"] * 20), 8)
    np.testing.assert_array_equal(long, [49406] + [2368] * 7 + [49407])


def test_decode_inverts_tokenize_up_to_cleaning(tokenizer):
    text = "Two DOGS   playing, in the snow!"
    assert tokenizer.decode(tokenizer.tokenize(text, 30)) == "two dogs playing , in the snow !"
    assert tokenizer.decode(tokenizer.tokenize("Café 東京 🐱", 30)) == "café 東京 🐱"
    # Stops at the end token, skips start and padding.
    assert tokenizer.decode([49406, 2368, 49407, 320]) == "cat"


def test_pickles_by_value(tokenizer):
    clone = pickle.loads(pickle.dumps(tokenizer))
    np.testing.assert_array_equal(
        clone.tokenize("a red cube on a blue sphere", 16),
        tokenizer.tokenize("a red cube on a blue sphere", 16),
    )


def test_references_and_their_errors(tmp_path, tokenizer):
    assert isinstance(load_tokenizer(tokenizer.name), clip_bpe.ClipBpeTokenizer)
    missing = str(tmp_path / "nowhere.txt.gz")
    with pytest.raises(FileNotFoundError, match="nowhere.txt.gz"):
        load_tokenizer(f"clip_bpe:{missing}")


def test_a_model_config_must_state_the_tokenizers_ids(tokenizer):
    fits = dict(vocab_size=49408, pad_id=0, bos_id=49406, eos_id=49407)
    check_model_fits(tokenizer, fits)
    with pytest.raises(ValueError, match="bos_id=49406 --config.model.eos_id=49407"):
        check_model_fits(tokenizer, dict(fits, bos_id=1, eos_id=2))
    with pytest.raises(ValueError, match="vocab_size is 512"):
        check_model_fits(tokenizer, dict(fits, vocab_size=512))
