"""Typed evaluator settings: every documented field is in the config and settable from the command
line (the real absl flag path); unknown keys and wrong types fail before any training."""

from __future__ import annotations

import dataclasses
import sys
from unittest import mock

import ml_collections
import pytest
from absl import flags
from ml_collections import config_flags

from sycoca_jax import train
from sycoca_jax.evaluation import captioning, registry, retrieval, settings, zeroshot
from tests.helpers import ROOT, config_for, tiny_config

CONFIG = ROOT / "configs" / "sycoca.py"


def parse(config_arg: str, *overrides: str):
    """``--config=<config_arg> <overrides>`` through absl and ml_collections, as the binaries
    parse them (ml_collections reads the override flags from ``sys.argv``)."""
    argv = ["prog", f"--config={config_arg}", *overrides]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True)
    with mock.patch.object(sys, "argv", argv):
        values(argv)
    return values.config


@pytest.mark.parametrize(
    "kind, cls",
    [
        ("zeroshot", zeroshot.Settings),
        ("retrieval", retrieval.Settings),
        ("captioning", captioning.Settings),
    ],
)
def test_each_entry_holds_every_field_of_its_settings(kind, cls):
    entry = registry.entry_config(kind, split="test")
    assert set(entry) == {"kind"} | {f.name for f in dataclasses.fields(cls)}
    assert settings.from_entry(cls, entry, "x") == cls(split="test")


def test_every_field_of_the_config_entries_is_settable_from_the_command_line():
    config = parse(
        f"{CONFIG}:tiny",
        "--config.evals.shapes_captioning.early_stopping=False",
        "--config.evals.shapes_captioning.min_len=2",
        "--config.evals.shapes_captioning.max_len=12",
        "--config.evals.shapes_captioning.tokenizer=python",
        "--config.evals.shapes_captioning.metrics=('bleu','cider')",
        "--config.evals.shapes_zeroshot.dataset=sycoca_shapes/other",
    )
    caption = registry.resolve(config, "shapes_captioning")
    assert caption.early_stopping is False and caption.min_len == 2 and caption.max_len == 12
    assert caption.tokenizer == "python" and caption.metrics == ("bleu", "cider")
    assert registry.resolve(config, "shapes_zeroshot").dataset == "sycoca_shapes/other"
    # Unset dataset: the training data's.
    assert registry.resolve(config, "shapes_retrieval").dataset == config.data.name
    with pytest.raises(flags.IllegalFlagValueError, match="early_stopping"):
        parse(f"{CONFIG}:tiny", "--config.evals.shapes_captioning.early_stopping=maybe")


def _config_file(tmp_path, body: str) -> str:
    path = tmp_path / "my_config.py"
    path.write_text(
        "import importlib.util\n"
        f"spec = importlib.util.spec_from_file_location('base', {str(CONFIG)!r})\n"
        "base = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(base)\n\n"
        "def get_config():\n"
        "    config = base.get_config('tiny')\n"
        f"    {body}\n"
        "    return config\n"
    )
    return str(path)


def test_unknown_or_mistyped_key_in_a_config_file_fails_before_training(tmp_path, data_dir):
    config = parse(_config_file(tmp_path, "config.evals.shapes_captioning.early_stoping = False"))
    config.data.name, config.data.data_dir = tiny_config(data_dir).data.name, data_dir
    config.total_steps = 1
    workdir = tmp_path / "run"
    with pytest.raises(ValueError) as raised:
        train.train_and_evaluate(config, str(workdir))
    message = str(raised.value)
    assert message.startswith("config.evals.shapes_captioning: unknown key(s) ['early_stoping']")
    assert "valid keys: [" in message and "'early_stopping'" in message and "\n" not in message
    # Nothing trained or written.
    assert not (workdir / "checkpoints").exists() and not (workdir / "metrics.jsonl").exists()

    typed = config_for("tiny")
    # A config file may build an entry by hand (ConfigDict checks types only on assignment).
    entry = typed.evals.shapes_retrieval.to_dict()
    typed.evals.shapes_retrieval = ml_collections.ConfigDict({**entry, "batch_size": "32"})
    with pytest.raises(ValueError, match=r"shapes_retrieval: batch_size='32' is not of type int"):
        registry.resolve(typed, "shapes_retrieval")
    typed.evals.shapes_retrieval = ml_collections.ConfigDict({**entry, "batch_size": 0})
    with pytest.raises(ValueError, match=r"shapes_retrieval: batch_size=0 must be >= 1"):
        registry.resolve(typed, "shapes_retrieval")
