"""Captioning metrics as the COCO caption server computes them, with nothing downloaded.

- BLEU-1..4 and CIDEr-D come from ``pycocoevalcap``'s own scorers (``Bleu``, ``Cider``; its
  ``Cider`` is the CIDEr-D variant: clipped counts and a Gaussian length penalty, with document
  frequencies taken from the evaluated references, so a corpus of one image scores 0).
- METEOR runs ``pycocoevalcap``'s bundled ``meteor-1.5.jar`` when ``java`` is on PATH.
- SPICE needs Stanford CoreNLP 3.6.0 models that ``pycocoevalcap`` does not ship (its wrapper
  downloads them on first use); it runs only when they are already in place.

A metric that cannot run is reported as the string ``"unavailable: <why>"``, never as 0.

Tokenisation: COCO evaluation first runs Stanford's PTBTokenizer (Java) and drops punctuation
tokens. ``tokenize_caption`` is a pure-Python rendition of it for ordinary captions (lowercase,
clitics split as ``do n't`` / ``dog 's``, punctuation removed, brackets as ``-lrb-``,
abbreviations and initialisms keep their period, numbers like ``1,000`` and ``3.5`` stay whole),
so BLEU and CIDEr work without Java. ``tokenizer="auto"`` uses PTBTokenizer when Java is present
and the Python one otherwise; the result says which (``tokenizer``). Known differences, all rare in
captions: URLs and e-mail addresses, emoticons, HTML-like tags, ``c++``, ``'90s``, ``y'all``,
currency symbols other than ``$`` (PTB rewrites them to ``$``).
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Mapping, Sequence

from absl import logging

METRICS = ("bleu", "cider", "meteor", "spice")
TOKENIZERS = ("auto", "ptb", "python")
UNAVAILABLE = "unavailable: "

# Tokens pycocoevalcap removes after PTB tokenisation (its list, lowercased output included).
PUNCTUATION = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-"]
    + ["--", "...", ";"]
)
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
# Words PTBTokenizer keeps their period on (checked against it; a single letter also does).
_ABBREVIATIONS = (
    "mrs mr ms dr sr jr st mt prof gen sgt etc vs inc ltd corp co ave rd ft dept est calif "
    "jan feb aug sept oct dec"
).split()
# Typographic quotes, ellipsis and dashes as PTB reads them.
_NORMALIZE = str.maketrans(
    {
        "\u2018": "'",
        "\u2019": "'",
        "\u201c": '"',
        "\u201d": '"',
        "\u2026": "...",
        "\u2013": "--",
        "\u2014": "--",
    }
)
_TOKEN = re.compile(
    r"""
    (?:[^\W\d_]\.){2,}                                  # initialisms: u.s.  e.g.  p.m.
    | (?:(?:"""
    + "|".join(_ABBREVIATIONS)
    + r""")|[^\W\d_])\.(?!\w)                           # abbreviations, initials: mr.  a.
    | no\.(?=\s*\d)                                      # no. 5
    | '(?:s|m|d|re|ve|ll)(?!\w)                        # a detached clitic: man 's
    | \w+(?:(?:[./-]|'(?=[^\W\d_])|(?<=\d)[,:](?=\d))\w+)*  # hot-dog o'clock 3.5 1,000 a/b
    | \.\.\.|--+|[?!]+                                  # runs of punctuation
    | \S                                                # any other single character
    """,
    re.VERBOSE | re.IGNORECASE,
)
_SPLIT_WORDS = {  # PTB splits these into two tokens
    "cannot": ("can", "not"),
    "gonna": ("gon", "na"),
    "gotta": ("got", "ta"),
    "wanna": ("wan", "na"),
    "gimme": ("gim", "me"),
    "lemme": ("lem", "me"),
}
_CLITIC = re.compile(r"^(.+?)(n't|'s|'m|'d|'re|'ve|'ll)$", re.IGNORECASE)


def _split_word(word: str) -> list[str]:
    lowered = word.lower()
    if lowered in _SPLIT_WORDS:
        return list(_SPLIT_WORDS[lowered])
    match = _CLITIC.match(word)
    if match:
        return [match.group(1), match.group(2)]
    return [word]


def tokenize_caption(text: str) -> str:
    """PTBTokenizer(-lowerCase) + pycocoevalcap's punctuation removal, in Python."""
    tokens = []
    for match in _TOKEN.finditer(text.translate(_NORMALIZE)):
        token = match.group(0)
        if token.startswith("--"):
            token = "--"  # any run of hyphens is one dash token
        if token in _BRACKETS:
            tokens.append(_BRACKETS[token])
        elif token[0].isalnum():
            tokens.extend(_split_word(token))
        else:
            tokens.append(token)
    return " ".join(t.lower() for t in tokens if t not in PUNCTUATION and t != '"')


# --------------------------------------------------------------------------------- Java tools
def java_missing() -> str | None:
    """Why Java tools cannot run, or None when ``java`` is on PATH."""
    return None if shutil.which("java") else "java is not on PATH"


def ptb_tokenize(texts: Sequence[str]) -> list[str]:
    """pycocoevalcap's PTBTokenizer (Java) on each text; empty texts stay empty."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    reason = java_missing()
    if reason:
        raise RuntimeError(f"PTBTokenizer needs Java: {reason}")
    # Its wrapper pairs output lines with inputs; an empty text can drop a line, so skip them.
    keep = [i for i, t in enumerate(texts) if t.strip()]
    out = [""] * len(texts)
    if keep:
        tokenized = PTBTokenizer().tokenize({i: [{"caption": texts[i]}] for i in keep})
        for i in keep:
            out[i] = tokenized[i][0]
    return out


def tokenize_texts(texts: Sequence[str], tokenizer: str = "auto") -> tuple[list[str], str]:
    """(tokenised texts, the tokenizer used: ``ptb`` or ``python``). ``auto`` takes PTBTokenizer
    when Java is present and falls back to Python if it fails (its wrapper writes a temp file
    into pycocoevalcap's package directory)."""
    if tokenizer not in TOKENIZERS:
        raise ValueError(f"caption tokenizer must be one of {TOKENIZERS}, got {tokenizer!r}")
    if tokenizer == "ptb":
        return ptb_tokenize(texts), "ptb"
    if tokenizer == "auto" and java_missing() is None:
        try:
            return ptb_tokenize(texts), "ptb"
        except (OSError, KeyError) as e:  # e.g. its temp file in a read-only site-packages
            logging.warning("PTBTokenizer failed (%s); using the Python tokenizer", e)
    return [tokenize_caption(t) for t in texts], "python"


def _meteor(gts: Mapping[int, list[str]], res: Mapping[int, list[str]]) -> float | str:
    reason = java_missing()
    if reason:
        return UNAVAILABLE + reason
    from pycocoevalcap.meteor.meteor import Meteor

    try:
        scorer = Meteor()
    except OSError as e:
        return f"{UNAVAILABLE}could not start METEOR ({e})"
    try:
        score, _ = scorer.compute_score(gts, res)
        return float(score)
    except (OSError, ValueError) as e:  # the JVM died or answered nonsense
        logging.warning("METEOR failed: %s", e)
        return f"{UNAVAILABLE}METEOR failed ({type(e).__name__}: {e})"
    finally:
        # Its wrapper keeps its lock when the JVM fails mid-answer; __del__ would then hang.
        if scorer.lock.locked():
            scorer.lock.release()
        scorer.__del__()


def spice_models_missing() -> str | None:
    """Why SPICE cannot run without a download, or None."""
    import pycocoevalcap.spice.spice as spice_module

    lib = os.path.join(os.path.dirname(spice_module.__file__), "lib")
    needed = [f"stanford-corenlp-3.6.0{suffix}.jar" for suffix in ("", "-models")]
    absent = [name for name in needed if not os.path.exists(os.path.join(lib, name))]
    if absent:
        return (
            f"SPICE needs Stanford CoreNLP 3.6.0 ({', '.join(absent)} in {lib}); pycocoevalcap "
            "does not ship it and we do not download it"
        )
    return None


def _spice(gts: Mapping[int, list[str]], res: Mapping[int, list[str]]) -> float | str:
    reason = java_missing() or spice_models_missing()
    if reason:
        return UNAVAILABLE + reason
    import subprocess

    from pycocoevalcap.spice.spice import Spice

    try:
        score, _ = Spice().compute_score(gts, res)
        return float(score)
    except (OSError, ValueError, subprocess.CalledProcessError) as e:
        logging.warning("SPICE failed: %s", e)
        return f"{UNAVAILABLE}SPICE failed ({type(e).__name__}: {e})"


# --------------------------------------------------------------------------------- scoring
def score_captions(
    predictions: Sequence[str],
    references: Sequence[Sequence[str]],
    *,
    metrics: Sequence[str] = METRICS,
    tokenizer: str = "auto",
) -> dict[str, float | str | int]:
    """Corpus metrics of ``predictions[i]`` against ``references[i]`` (untokenised strings).

    Empty references are dropped; an image left with none is not scored. Returns ``bleu_1`` ..
    ``bleu_4``, ``cider``, ``meteor``, ``spice`` (those asked for; a string where unavailable),
    ``tokenizer`` and ``num_images`` (the images scored).
    """
    unknown = sorted(set(metrics) - set(METRICS))
    if unknown:
        raise ValueError(f"unknown caption metrics {unknown}; known: {METRICS}")
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists")
    pairs = []
    for prediction, refs in zip(predictions, references, strict=True):
        refs = [r for r in refs if r and r.strip()]
        if refs:
            pairs.append((prediction, refs))
    if not pairs:
        raise ValueError("no image has a non-empty reference caption to score against")
    texts = [p for p, _ in pairs] + [r for _, refs in pairs for r in refs]
    tokenized, used = tokenize_texts(texts, tokenizer)
    res, gts, cursor = {}, {}, len(pairs)
    for i, (_, refs) in enumerate(pairs):
        res[i] = [tokenized[i]]
        gts[i] = tokenized[cursor : cursor + len(refs)]
        cursor += len(refs)

    out: dict[str, float | str | int] = {}
    if "bleu" in metrics:
        from pycocoevalcap.bleu.bleu import Bleu

        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        out.update({f"bleu_{n + 1}": float(b) for n, b in enumerate(bleu)})
    if "cider" in metrics:
        from pycocoevalcap.cider.cider import Cider

        out["cider"] = float(Cider().compute_score(gts, res)[0])
    if "meteor" in metrics:
        out["meteor"] = _meteor(gts, res)
    if "spice" in metrics:
        out["spice"] = _spice(gts, res)
    out["tokenizer"] = used
    out["num_images"] = len(pairs)
    return out
