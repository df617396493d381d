"""Caption metrics: pycocoevalcap's own scorers on our tokenisation, the Python tokenizer against
Stanford's PTBTokenizer, and unavailable metrics reported as such (never as 0)."""

from __future__ import annotations

import math
import shutil

import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider

from sycoca_jax.data import shapes
from sycoca_jax.evaluation import caption_metrics as cm

needs_java = pytest.mark.skipif(
    shutil.which("java") is None, reason="PTBTokenizer/METEOR need java on PATH"
)

# A fixed sample: raw captions, and the same captions tokenised by hand as COCO evaluation does
# (lowercase, PTB tokens, punctuation removed).
PREDICTIONS = [
    "A man riding a wave on top of a surfboard.",
    "Two dogs playing in the snow!",
    "A plate of food, with broccoli.",
    "A red circle.",
]
PREDICTIONS_TOKENIZED = [
    "a man riding a wave on top of a surfboard",
    "two dogs playing in the snow",
    "a plate of food with broccoli",
    "a red circle",
]
REFERENCES = [
    [
        "A surfer rides a large wave.",
        "A man on a surfboard riding a wave.",
        "Surfing: a man's day.",
    ],
    ["Two dogs play in the snow.", "A pair of dogs (one black) running in snow."],
    ["A plate with broccoli and meat.", "Food on a white plate, with greens.", ""],
    ["A big red circle in the centre", "one shape: a red circle"],
]
REFERENCES_TOKENIZED = [
    ["a surfer rides a large wave", "a man on a surfboard riding a wave", "surfing a man 's day"],
    ["two dogs play in the snow", "a pair of dogs -lrb- one black -rrb- running in snow"],
    ["a plate with broccoli and meat", "food on a white plate with greens"],
    ["a big red circle in the centre", "one shape a red circle"],
]

# Ordinary captions with the punctuation, clitics, brackets, numbers and abbreviations that
# COCO-style captions contain.
ORDINARY = [
    *PREDICTIONS,
    *[r for refs in REFERENCES for r in refs if r],
    "The cat's toy isn't here; it's \"gone\"...",
    "A black-and-white photo of 3.5 cars, 1,000 people & a bus/train -- wow",
    "Kids' toys: balls, bats?  And   more",
    "I can't, won't, don't: I'm sure you're right, we've seen they'll go, he'd say.",
    "Mr. Smith's dog in the U.S. at 3 p.m., e.g. near St. Louis etc.",
    "It\u2019s a dog\u2019s \u201ctoy\u201d on a 2-year-old\u2019s bed \u2013 cute\u2026",
    "A man (maybe a chef) cooks [something] {odd}.",
    'A sign that reads "STOP" at 10:30 on 9/11.',
    "What?! A cat cannot be on a 100% wooden table!!!",
    "a man' s hat and the players' bench",
    "An ice-cream cone -- melting - fast.",
    "A train that is No. 5, at the station.",
    "People wait for the bus; some sit, others stand.",
    "  Extra   spaces\tand tabs  ",
]


def _shapes_captions(n: int = 40) -> list[str]:
    return [c for i in range(n) for c in shapes.make_example(0, "test", i, 0.5).captions]


def test_python_tokenizer_on_known_cases():
    assert cm.tokenize_caption("A man's hat, (red).") == "a man 's hat -lrb- red -rrb-"
    assert cm.tokenize_caption("Don't STOP... it's 3.5 miles!") == "do n't stop it 's 3.5 miles"
    assert cm.tokenize_caption("Dr. Who and the U.S. flag.") == "dr. who and the u.s. flag"
    assert cm.tokenize_caption("  ") == ""
    for raw, tokenized in zip(PREDICTIONS, PREDICTIONS_TOKENIZED, strict=True):
        assert cm.tokenize_caption(raw) == tokenized


@needs_java
def test_python_tokenizer_matches_ptbtokenizer():
    texts = ORDINARY + _shapes_captions()
    ptb = cm.ptb_tokenize(texts)
    mismatches = [
        (t, p, cm.tokenize_caption(t))
        for t, p in zip(texts, ptb, strict=True)
        if cm.tokenize_caption(t) != p
    ]
    assert not mismatches
    flat_refs = [r for refs in REFERENCES_TOKENIZED for r in refs]
    assert cm.ptb_tokenize([r for refs in REFERENCES for r in refs if r]) == flat_refs


def _pycocoevalcap(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    gts = {i: refs for i, refs in enumerate(references)}
    res = {i: [p] for i, p in enumerate(predictions)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    return {
        **{f"bleu_{n + 1}": b for n, b in enumerate(bleu)},
        "cider": Cider().compute_score(gts, res)[0],
    }


def test_bleu_and_cider_equal_pycocoevalcap():
    expected = _pycocoevalcap(PREDICTIONS_TOKENIZED, REFERENCES_TOKENIZED)
    got = cm.score_captions(PREDICTIONS, REFERENCES, metrics=("bleu", "cider"), tokenizer="python")
    assert got["tokenizer"] == "python" and got["num_images"] == 4
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key
    assert 0 < got["bleu_4"] < got["bleu_1"] < 1 and got["cider"] > 0


@needs_java
def test_bleu_and_cider_with_ptbtokenizer_agree():
    python = cm.score_captions(
        PREDICTIONS, REFERENCES, metrics=("bleu", "cider"), tokenizer="python"
    )
    ptb = cm.score_captions(PREDICTIONS, REFERENCES, metrics=("bleu", "cider"), tokenizer="auto")
    assert ptb["tokenizer"] == "ptb"
    for key in ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "cider"):
        assert ptb[key] == pytest.approx(python[key], abs=1e-12), key


def test_known_values():
    """Hand-computed: a hypothesis shorter than its reference pays BLEU's brevity penalty (so
    hypothesis and references are not swapped); a perfect match scores 1."""
    got = cm.score_captions(
        ["a red circle"], [["a big red circle here"]], metrics=("bleu",), tokenizer="python"
    )
    assert got["bleu_1"] == pytest.approx(math.exp(1 - 5 / 3), rel=1e-6)
    same = cm.score_captions(
        ["a red circle in the centre"],
        [["A red circle in the centre."]],
        metrics=("bleu",),
        tokenizer="python",
    )
    assert same["bleu_4"] == pytest.approx(1.0, rel=1e-6)
    # CIDEr's document frequencies come from the references: a distinctive match scores high.
    preds = ["a red circle", "a blue square", "a green star"]
    refs = [["a red circle"], ["a blue square"], ["a green star"]]
    assert cm.score_captions(preds, refs, metrics=("cider",), tokenizer="python")["cider"] > 5


def test_without_java_metrics_are_unavailable_not_zero(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    got = cm.score_captions(PREDICTIONS, REFERENCES, tokenizer="auto")
    assert got["tokenizer"] == "python"
    assert got["meteor"] == "unavailable: java is not on PATH"
    assert got["spice"].startswith("unavailable: ")
    expected = _pycocoevalcap(PREDICTIONS_TOKENIZED, REFERENCES_TOKENIZED)
    assert got["bleu_4"] == pytest.approx(expected["bleu_4"], abs=1e-12)
    with pytest.raises(RuntimeError, match="java"):
        cm.tokenize_texts(["a cat"], "ptb")


# pycocoevalcap 1.2's own ``Meteor().compute_score`` on PREDICTIONS_TOKENIZED against
# REFERENCES_TOKENIZED (pinned rather than recomputed: each METEOR JVM takes seconds to load).
METEOR_EXPECTED = 0.42078234521325236


@needs_java
def test_meteor_runs_with_java_and_spice_never_downloads():
    got = cm.score_captions(PREDICTIONS, REFERENCES, metrics=("meteor", "spice"))
    assert got["meteor"] == pytest.approx(METEOR_EXPECTED, abs=1e-9)
    reason = cm.spice_models_missing()
    if reason:  # pycocoevalcap does not ship CoreNLP: reported, not downloaded
        assert got["spice"] == "unavailable: " + reason
    else:
        assert isinstance(got["spice"], float) or got["spice"].startswith("unavailable: ")


def test_edge_cases_and_errors():
    got = cm.score_captions(
        ["", "a dog", "a cat"], [["a dog runs"], ["a dog"], ["", "  "]], metrics=("bleu", "cider")
    )
    assert got["num_images"] == 2  # the image without a non-empty reference is not scored
    assert 0 <= got["bleu_1"] < 1
    with pytest.raises(ValueError, match="unknown caption metrics"):
        cm.score_captions(["a"], [["a"]], metrics=("rouge",))
    with pytest.raises(ValueError, match="reference lists"):
        cm.score_captions(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="no image"):
        cm.score_captions(["a"], [[""]])
    with pytest.raises(ValueError, match="tokenizer"):
        cm.tokenize_texts(["a"], "spacy")
