"""Tokenizers: SentencePiece (ours) and, in ``clip_bpe``, CLIP's BPE (open_clip's), one interface.

Every tokenizer has ``special_ids`` (pad, bos, eos); the model config states the same ids
(``config.model.pad_id/bos_id/eos_id``) and ``check_model_fits`` compares the two where a
tokenizer meets a model. ``config.data.tokenizer`` names one: a SentencePiece ``.model`` path,
``clip_bpe`` or ``clip_bpe:PATH`` (see ``sycoca_jax.data.clip_bpe``), or nothing (the dataset's
bundled SentencePiece model).

SentencePiece special ids (``config.model`` defaults):

  ======  ===  =============================================
  pad      0   fills every position after ``eos``
  bos      1   first token of every caption
  eos      2   closes every caption (kept when truncating)
  unk      3   pieces the model does not know
  ======  ===  =============================================

Models we train use exactly these ids. A user model with other special ids is remapped on load
(its specials move to 0..3, other pieces keep their order after them, a missing bos/eos gets a new
id at the end); a model without a pad piece is refused, since captions are right padded.

A caption becomes ``max_text_len + 1`` int32 ids, ``[bos, pieces..., eos, pad, ...]``; a caption
too long keeps bos, its first ``max_text_len - 1`` pieces and eos. The captioning shift (input =
tokens[:, :-1], target = tokens[:, 1:]) is *not* done here: it happens once, in
``sycoca_jax.models.text.caption_input_and_target``.

Train one from a dataset's captions::

  python -m sycoca_jax.data.tokenizer train --dataset=cc3m --data_dir=/data/tfds \
      --vocab_size=32000 --output=/data/tokenizers/cc3m_32k.model
"""

from __future__ import annotations

import abc
import argparse
import io
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from importlib import resources
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
from etils import epath

if TYPE_CHECKING:
    import sentencepiece as spm


class SpecialIds(NamedTuple):
    """The ids captions are built from: ``[bos, pieces..., eos, pad, ...]``."""

    pad: int
    bos: int
    eos: int


PAD_ID = 0
BOS_ID = 1
EOS_ID = 2
UNK_ID = 3
SENTENCEPIECE_IDS = SpecialIds(PAD_ID, BOS_ID, EOS_ID)
CLIP_BPE = "clip_bpe"  # the reference naming CLIP's BPE (``clip_bpe`` or ``clip_bpe:PATH``)
# The tokenizer of the embedded dataset, regenerated with (about 20 s, most of it building data):
#   python -m sycoca_jax.data.tokenizer train --dataset=sycoca_shapes --vocab_size=512 \
#       --model_type=bpe --character_coverage=1.0 --output=sycoca_jax/data/sycoca_shapes.model
BUNDLED_SHAPES_MODEL = "sycoca_shapes.model"


def pack_ids(ids: Iterable[int], max_text_len: int, special: SpecialIds) -> np.ndarray:
    """``[bos, ids..., eos, pad...]`` int32 of shape ``(max_text_len + 1,)``; too many ids keep
    the first ``max_text_len - 1`` (eos is always there)."""
    if max_text_len < 2:
        raise ValueError(f"max_text_len must be at least 2 (bos + eos), got {max_text_len}")
    ids = list(ids)[: max_text_len - 1]
    out = np.full((max_text_len + 1,), special.pad, np.int32)
    out[0] = special.bos
    out[1 : len(ids) + 1] = ids
    out[len(ids) + 1] = special.eos
    return out


class BaseTokenizer(abc.ABC):
    """What every tokenizer shares, so both pack captions one way: texts and ids into
    ``[bos, ids..., eos, pad...]`` rows. A subclass gives ``encode`` and ``special_ids``."""

    special_ids: SpecialIds

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Pieces of ``text`` as ids, without bos/eos."""

    def tokenize(self, text: str, max_text_len: int) -> np.ndarray:
        """``[bos, pieces..., eos, pad...]`` as int32 of shape ``(max_text_len + 1,)``."""
        return self.tokenize_ids(self.encode(text), max_text_len)

    def tokenize_ids(self, ids: Iterable[int], max_text_len: int) -> np.ndarray:
        return pack_ids(ids, max_text_len, self.special_ids)

    def tokenize_batch(self, texts: Iterable[str], max_text_len: int) -> np.ndarray:
        rows = [self.tokenize(t, max_text_len) for t in texts]
        if not rows:
            return np.zeros((0, max_text_len + 1), np.int32)
        return np.stack(rows)


class Tokenizer(BaseTokenizer):
    """A SentencePiece model seen through the fixed pad/bos/eos/unk ids; picklable (grain
    workers receive it by value)."""

    special_ids = SENTENCEPIECE_IDS

    def __init__(self, model_proto: bytes, *, name: str = "<in memory>"):
        self._proto = bytes(model_proto)
        self.name = name
        self._load()

    def _load(self) -> None:
        import sentencepiece as spm  # where used: a bare accelerator host has none

        self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
        self._to_ours, self._to_theirs = _id_maps(self._sp, self.name)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> Tokenizer:
        """A local or ``gs://`` (``etils.epath``) model file."""
        return cls(epath.Path(path).read_bytes(), name=os.fspath(path))

    def __getstate__(self) -> dict:
        return {"proto": self._proto, "name": self.name}

    def __setstate__(self, state: dict) -> None:
        self._proto, self.name = state["proto"], state["name"]
        self._load()

    @property
    def vocab_size(self) -> int:
        """Number of ids, specials included; ``config.model.vocab_size`` must be at least this."""
        return len(self._to_theirs)

    @property
    def model_proto(self) -> bytes:
        return self._proto

    def encode(self, text: str) -> list[int]:
        """Pieces of ``text`` as ids, without bos/eos."""
        ids = self._sp.encode(text)
        return [int(i) for i in self._to_ours[np.asarray(ids, np.int64)]] if ids else []

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``: stops at the first eos, ignores bos and pad."""
        pieces = []
        for i in ids:
            i = int(i)
            if i == EOS_ID:
                break
            if i in (PAD_ID, BOS_ID):
                continue
            theirs = int(self._to_theirs[i])
            if theirs >= 0:
                pieces.append(theirs)
        return self._sp.decode(pieces)

    def id_to_piece(self, i: int) -> str:
        theirs = int(self._to_theirs[i])
        return ("<pad>", "<s>", "</s>", "<unk>")[i] if theirs < 0 else self._sp.id_to_piece(theirs)


def _id_maps(sp: spm.SentencePieceProcessor, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(theirs -> ours, ours -> theirs) id tables; -1 in ours -> theirs marks an added id."""
    n = sp.get_piece_size()
    pad, bos, eos, unk = sp.pad_id(), sp.bos_id(), sp.eos_id(), sp.unk_id()
    if (pad, bos, eos, unk) == (PAD_ID, BOS_ID, EOS_ID, UNK_ID):
        identity = np.arange(n, dtype=np.int64)
        return identity, identity.copy()
    if pad < 0:
        raise ValueError(
            f"SentencePiece model {name} has no pad piece (pad_id=-1); captions are right padded "
            "with id 0. Retrain it with `python -m sycoca_jax.data.tokenizer train ...` (which "
            "sets pad_id=0, bos_id=1, eos_id=2, unk_id=3) or with --pad_id=0 in spm_train."
        )
    specials = [pad, bos, eos, unk]
    others = [i for i in range(n) if i not in specials]
    ours_to_theirs = np.array(specials + others, np.int64)  # -1 stays -1: an added bos/eos
    theirs_to_ours = np.full((n,), UNK_ID, np.int64)
    for ours, theirs in enumerate(ours_to_theirs):
        if theirs >= 0:
            theirs_to_ours[theirs] = ours
    return theirs_to_ours, ours_to_theirs


def bundled_model_path() -> str:
    """Path of the tokenizer trained on the embedded ``sycoca_shapes`` captions."""
    return str(resources.files("sycoca_jax.data").joinpath(BUNDLED_SHAPES_MODEL))


def load_tokenizer(path: str | None, dataset: str | None = None) -> BaseTokenizer:
    """Loads ``path`` (a SentencePiece model, or ``clip_bpe[:PATH]``); with no path, the bundled
    tokenizer of ``sycoca_shapes``."""
    if path and (path == CLIP_BPE or path.startswith(CLIP_BPE + ":")):
        from sycoca_jax.data import clip_bpe  # tokenizers and ftfy, only where used

        return clip_bpe.ClipBpeTokenizer.from_reference(path)
    if path:
        if not epath.Path(path).exists():
            raise FileNotFoundError(f"tokenizer model {path!r} does not exist")
        return Tokenizer.from_file(path)
    if dataset is None or dataset.split("/")[0] == "sycoca_shapes":
        return Tokenizer.from_file(bundled_model_path())
    raise ValueError(
        f"config.data.tokenizer is not set and dataset {dataset!r} has no bundled tokenizer; "
        f"train one with `python -m sycoca_jax.data.tokenizer train --dataset={dataset} "
        "--data_dir=... --vocab_size=32000 --output=...` and set --config.data.tokenizer"
    )


def check_model_fits(tokenizer: BaseTokenizer, model_config: Mapping[str, Any]) -> None:
    """The model config's vocabulary holds the tokenizer's ids and states its special ids."""
    if tokenizer.vocab_size > model_config["vocab_size"]:
        raise ValueError(
            f"tokenizer {tokenizer.name} has {tokenizer.vocab_size} ids but "
            f"config.model.vocab_size is {model_config['vocab_size']}; raise the model's "
            "vocab_size or use a smaller tokenizer"
        )
    defaults = SENTENCEPIECE_IDS._asdict()
    stated = SpecialIds(**{k: model_config.get(f"{k}_id", v) for k, v in defaults.items()})
    if stated != tokenizer.special_ids:
        want = tokenizer.special_ids
        raise ValueError(
            f"tokenizer {tokenizer.name} has special ids {want._asdict()} but config.model "
            f"states {stated._asdict()}; set --config.model.pad_id={want.pad} "
            f"--config.model.bos_id={want.bos} --config.model.eos_id={want.eos}"
        )


def train_tokenizer(
    sentences: Iterable[str],
    *,
    vocab_size: int,
    model_type: str = "unigram",
    output: str | None = None,
    character_coverage: float = 0.9995,
    hard_vocab_limit: bool = False,
    max_sentences: int = 5_000_000,
) -> Tokenizer:
    """Trains a model with the fixed special ids from ``sentences``, sorted first so the result
    depends on their multiset only, not on record order.

    ``hard_vocab_limit=False`` lets a small corpus yield fewer than ``vocab_size`` pieces instead
    of failing; ``vocab_size`` is then an upper bound.
    """
    corpus = sorted(s.strip() for s in sentences if s and s.strip())
    if not corpus:
        raise ValueError("no non-empty sentences to train a tokenizer on")
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_writer=model,
        vocab_size=vocab_size,
        model_type=model_type,
        hard_vocab_limit=hard_vocab_limit,
        character_coverage=character_coverage,
        pad_id=PAD_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        unk_id=UNK_ID,
        input_sentence_size=max_sentences,
        shuffle_input_sentence=True,
        num_threads=1,  # deterministic output
        minloglevel=2,
    )
    tokenizer = Tokenizer(model.getvalue(), name=output or "<trained>")
    if output:
        epath.Path(output).parent.mkdir(parents=True, exist_ok=True)
        epath.Path(output).write_bytes(tokenizer.model_proto)
    return tokenizer


def _train_command(args: argparse.Namespace) -> None:
    from sycoca_jax.data import sources  # tfds is only needed to read a dataset

    if bool(args.dataset) == bool(args.text_file):
        raise SystemExit("give exactly one of --dataset or --text_file")
    if args.dataset:
        texts = sources.dataset_texts(
            args.dataset, args.split, data_dir=args.data_dir, max_records=args.max_records
        )
    else:
        with open(args.text_file, encoding="utf-8") as f:
            texts = [line.rstrip("\n") for line in f]
    tokenizer = train_tokenizer(
        texts,
        vocab_size=args.vocab_size,
        model_type=args.model_type,
        output=args.output,
        character_coverage=args.character_coverage,
        hard_vocab_limit=args.hard_vocab_limit,
    )
    print(
        f"wrote {args.output}: {tokenizer.vocab_size} pieces "
        f"(pad={PAD_ID}, bos={BOS_ID}, eos={EOS_ID}, unk={UNK_ID})"
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m sycoca_jax.data.tokenizer", description=__doc__.split("\n")[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train a SentencePiece model on captions")
    train.add_argument("--dataset", help="dataset name, e.g. sycoca_shapes, cc3m, coco_captions")
    train.add_argument("--split", default="train")
    train.add_argument("--data_dir", default=None, help="TFDS data dir ($SYCOCA_DATA_DIR)")
    train.add_argument("--text_file", help="or: one sentence per line")
    train.add_argument("--vocab_size", type=int, required=True)
    train.add_argument("--model_type", default="unigram", choices=("unigram", "bpe"))
    train.add_argument("--output", required=True, help="path of the .model file to write")
    train.add_argument(
        "--max_records",
        type=int,
        default=2_000_000,
        help="read at most this many records (evenly spread) of the split",
    )
    train.add_argument("--character_coverage", type=float, default=0.9995)
    train.add_argument(
        "--hard_vocab_limit",
        action="store_true",
        help="fail instead of producing fewer pieces than --vocab_size",
    )
    args = parser.parse_args(argv)
    _train_command(args)


if __name__ == "__main__":
    main(sys.argv[1:])
