"""CLIP's byte-level BPE tokenizer (open_clip's ``SimpleTokenizer``) on the ``tokenizers`` library.

Same interface as the SentencePiece ``Tokenizer``; its special ids are CLIP's: pad 0 (the id of
"!", which open_clip's CoCa also reads as padding), start 49406 (``<start_of_text>``, our bos)
and end 49407 (``<end_of_text>``, our eos), vocabulary 49,408.

Text goes through open_clip's default cleaning first (``ftfy.fix_text``, HTML unescaped twice,
whitespace collapsed, lower case), then the CLIP split pattern, bytes to unicode and BPE with the
``</w>`` end-of-word suffix, so the ids equal open_clip's. ``tokenize(text, max_text_len)``
equals open_clip's ``tokenize(text, context_length=max_text_len + 1)``: a text too long keeps
its first ``max_text_len - 1`` pieces and ends with the end token.

The vocabulary is open_clip's merges file, never shipped here: the reference ``clip_bpe``
(``config.data.tokenizer``) finds ``bpe_simple_vocab_16e6.txt.gz`` in the installed
``open_clip`` package (``pip install open_clip_torch --no-deps`` is enough; neither torch nor
open_clip is imported), ``clip_bpe:PATH`` reads it from PATH (local or ``gs://``).
"""

from __future__ import annotations

import gzip
import html
import importlib.util
import os
from collections.abc import Iterable

import ftfy
import tokenizers
from etils import epath

from sycoca_jax.data.tokenizer import CLIP_BPE as REFERENCE
from sycoca_jax.data.tokenizer import BaseTokenizer, SpecialIds

VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
NUM_MERGES = 49152 - 256 - 2  # the merges CLIP uses (the file holds more)
START, END = "<start_of_text>", "<end_of_text>"
# Contractions, letter runs, single digits, other non-space runs (CLIP's pattern; the text is
# lower-cased before, so case-insensitive matching changes nothing).
SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def installed_vocab_path() -> str:
    """open_clip's merges file, located through the installed package without importing it."""
    spec = importlib.util.find_spec("open_clip")
    path = None
    if spec is not None and spec.origin:
        path = os.path.join(os.path.dirname(spec.origin), VOCAB_FILE)
    if path is None or not os.path.exists(path):
        raise FileNotFoundError(
            f"the CLIP BPE vocabulary ({VOCAB_FILE}) was not found: install open_clip "
            "(`pip install open_clip_torch --no-deps` is enough; torch is not needed) or set "
            f"the tokenizer to {REFERENCE}:/path/to/{VOCAB_FILE}"
        )
    return path


def vocab_path(reference: str) -> str:
    """The merges file a ``clip_bpe`` / ``clip_bpe:PATH`` reference names."""
    _, _, path = reference.partition(":")
    return path or installed_vocab_path()


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    codes = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, codes), strict=True))


def clean(text: str) -> str:
    """open_clip's default ("lower") text cleaning."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return " ".join(text.split()).lower()


def _build(merges_text: str) -> tokenizers.Tokenizer:
    lines = merges_text.split("\n")[1 : NUM_MERGES + 1]
    merges = [tuple(line.split()) for line in lines]
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [START, END]
    model = tokenizers.models.BPE(
        vocab={piece: i for i, piece in enumerate(vocab)},
        merges=merges,
        end_of_word_suffix="</w>",
    )
    tokenizer = tokenizers.Tokenizer(model)
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Sequence(
        [
            tokenizers.pre_tokenizers.Split(
                tokenizers.Regex(SPLIT_PATTERN), behavior="removed", invert=True
            ),
            tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    # Written literally in a caption, the two markers are their special ids, as in open_clip.
    tokenizer.add_special_tokens([START, END])
    return tokenizer


class ClipBpeTokenizer(BaseTokenizer):
    """CLIP's BPE behind the ``Tokenizer`` interface; picklable by value (the merges file's
    bytes travel, so grain workers need no access to it)."""

    def __init__(self, vocab_gz: bytes, *, name: str = REFERENCE):
        self._gz = bytes(vocab_gz)
        self.name = name
        self._load()

    def _load(self) -> None:
        self._tok = _build(gzip.decompress(self._gz).decode("utf-8"))
        self._decoder = {c: b for b, c in bytes_to_unicode().items()}
        start, end = self._tok.token_to_id(START), self._tok.token_to_id(END)
        self.special_ids = SpecialIds(pad=0, bos=start, eos=end)

    @classmethod
    def from_reference(cls, reference: str) -> ClipBpeTokenizer:
        path = vocab_path(reference)
        if not epath.Path(path).exists():
            raise FileNotFoundError(f"CLIP BPE vocabulary {path!r} does not exist")
        return cls(epath.Path(path).read_bytes(), name=f"{REFERENCE}:{path}")

    def __getstate__(self) -> dict:
        return {"gz": self._gz, "name": self.name}

    def __setstate__(self, state: dict) -> None:
        self._gz, self.name = state["gz"], state["name"]
        self._load()

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        """BPE ids of ``text`` (after open_clip's cleaning), without start/end."""
        return self._tok.encode(clean(text), add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``: stops at the first end token, ignores start and pad; words are
        separated by single spaces (CLIP's BPE keeps no other spacing)."""
        pad, bos, eos = self.special_ids
        pieces = []
        for i in ids:
            i = int(i)
            if i == eos:
                break
            if i not in (pad, bos):
                pieces.append(self._tok.id_to_token(i))
        data = bytes(self._decoder[c] for c in "".join(pieces))
        return data.decode("utf-8", errors="replace").replace("</w>", " ").strip()

    def id_to_piece(self, i: int) -> str:
        return self._tok.id_to_token(int(i))
