"""Every numeric config field is checked before any work, each bad value named with its fix;
a duration set on the command line replaces the preset's (real absl flag parsing); a misspelt
``--config.x.y`` is named with the closest key."""

from __future__ import annotations

import pytest
from absl import flags
from ml_collections import config_flags

from sycoca_jax import binaries, config_checks, config_keys, durations
from sycoca_jax.errors import ConfigError, UserError
from tests.helpers import ROOT, config_for

PRESETS = [
    "tiny",
    "size=S/16",
    "size=B/16,objective=coca",
    "size=B/32,data=cc3m",
    "size=L/14,objective=clip,data=cc12m",
]


@pytest.mark.parametrize("arg", PRESETS)
def test_every_preset_is_valid(arg):
    config_checks.validate(config_for(arg), num_devices=8 if arg == "tiny" else 256)


BAD = [
    ("batch_size", 0, "batch_size=0 must be a positive integer"),
    ("batch_size", -8, "batch_size=-8 must be a positive integer"),
    ("microbatches", 3, "batch_size=32 must be divisible by microbatches=3"),
    ("log_every_steps", 0, "log_every_steps=0 must be a positive integer"),
    ("checkpoint_every_steps", 0, "checkpoint_every_steps=0 must be a positive integer"),
    ("eval_batches", 0, "eval_batches=0 must be a positive integer"),
    ("keep_checkpoints", 0, "keep_checkpoints=0 must be a positive integer"),
    ("total_steps", -5, "total_steps=-5 must be positive"),
    ("optim.lr", 0.0, "optim.lr=0.0 must be positive"),
    ("optim.b2", 1.0, r"optim.b2=1.0 must be in \[0.0, 1.0\)"),
    ("optim.schedule", "cosin", "optim.schedule='cosin' must be one of cosine, linear"),
    ("optim.warmup_steps", -1, "optim.warmup_steps=-1 must be >= 0"),
    ("model.patch_size", 7, "model.image_size=64 must be a multiple of model.patch_size=7"),
    ("model.image_heads", 3, "model.image_width=64 must be divisible by model.image_heads=3"),
    ("model.caption_keep_ratio", 0.0, r"model.caption_keep_ratio=0.0 must be in \(0.0, 1.0\]"),
    ("model.tgmim_mask_ratio", 1.0, r"model.tgmim_mask_ratio=1.0 must be in \(0.0, 1.0\)"),
    ("loss.itc_weight", -1.0, "loss.itc_weight=-1.0 must be >= 0"),
    ("data.crop_scale", (0.5, 0.2), r"data.crop_scale=\(0.5, 0.2\) must be two area fractions"),
    ("data.max_skipped_fraction", 1.5, "data.max_skipped_fraction=1.5 must be in"),
    ("data.num_workers", -1, "data.num_workers=-1 must be an integer >= 0"),
    ("data.device_prefetch", -1, "data.device_prefetch=-1 must be an integer >= 0"),
    ("profile_steps", "5,3", "profile_steps='5,3' must be FIRST,LAST with 1 <= FIRST <= LAST"),
    ("mesh.shape", (0, 1, 1), r"mesh.shape=\(0, 1, 1\) must be 3 sizes"),
    ("evals.shapes_captioning.num_beams", 0, "evals.shapes_captioning.num_beams=0 must be"),
    ("evals.shapes_retrieval.batch_size", 0, "evals.shapes_retrieval.batch_size=0 must be"),
]


def _set(config, dotted, value):
    *parents, leaf = dotted.split(".")
    for key in parents:
        config = config[key]
    config[leaf] = value


@pytest.mark.parametrize(("field", "value", "message"), BAD, ids=[f"{f}={v}" for f, v, _ in BAD])
def test_a_bad_value_is_named_with_its_fix(field, value, message):
    config = config_for("tiny")
    _set(config, field, value)
    with pytest.raises(ConfigError, match=message) as error:
        config_checks.validate(config, num_devices=8)
    assert f"--config.{field.split('.')[0]}" in str(error.value) or "set" in str(error.value)
    assert "\n" not in str(error.value) and isinstance(error.value, UserError)


def test_all_problems_are_reported_at_once():
    config = config_for("tiny")
    config.batch_size = 0
    config.log_every_steps = 0
    config.optim.eps = 0.0
    with pytest.raises(ConfigError) as error:
        config_checks.validate(config)
    assert str(error.value).count("must be") == 3


def test_two_durations_and_no_duration_are_named():
    config = config_for("tiny")
    config.total_epochs = 2.0
    with pytest.raises(ConfigError, match="total_steps=1500 and total_epochs=2.0 are all set"):
        config_checks.validate(config)
    config.total_epochs = config.total_steps = None
    with pytest.raises(ConfigError, match="no run length: set one of --config.total_steps"):
        config_checks.validate(config)


def test_the_batch_must_split_over_the_mesh():
    config = config_for("tiny")
    config.batch_size = 12
    with pytest.raises(ConfigError, match=r"batch_size=12 must be a multiple of .* = 8 on 8"):
        config_checks.validate(config, num_devices=8)
    config.mesh.shape = (3, 1, 1)
    with pytest.raises(ConfigError, match=r"mesh.shape=\(3, 1, 1\)"):
        config_checks.validate(config, num_devices=8)


# ------------------------------------------------------------------- durations from the flags
def _parse(monkeypatch, *overrides: str, arg: str = "size=B/16"):
    """The real absl + ml_collections path of the binaries, on a fresh set of flags."""
    argv = ["prog", f"--config={ROOT / 'configs' / 'sycoca.py'}:{arg}", *overrides]
    monkeypatch.setattr("sys.argv", argv)  # config_flags reads the overrides from sys.argv
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values)
    flag_values(argv)
    return binaries.config_from_flags(flag_values)


def test_total_steps_from_the_command_line_replaces_a_presets_epochs(monkeypatch):
    config = _parse(monkeypatch, "--config.total_steps=5")
    assert config.total_steps == 5 and config.total_epochs is None
    assert durations.run_length(config, num_examples=3_000_000) == (5, 2000)


def test_epochs_from_the_command_line_replace_a_presets_steps(monkeypatch):
    config = _parse(monkeypatch, "--config.total_epochs=2", "--config.optim.warmup_epochs=0.5")
    assert config.total_steps is None and config.optim.warmup_steps is None
    assert durations.run_length(config, num_examples=3_000_000) == (2930, 733)
    preset = _parse(monkeypatch, arg="tiny")
    assert preset.total_steps == 1500 and preset.optim.warmup_steps == 100


def test_two_units_of_one_duration_on_the_command_line_are_refused(monkeypatch):
    with pytest.raises(ConfigError, match="--config.total_steps and --config.total_epochs"):
        _parse(monkeypatch, "--config.total_steps=5", "--config.total_epochs=2")


# ------------------------------------------------------------------------------- typos
@pytest.mark.parametrize(
    ("key", "closest"),
    [
        ("optim.learning_rate", "optim.lr"),
        ("optim.lr_rate", "optim.lr"),
        ("optm.lr", "optim.lr"),
        ("batchsize", "batch_size"),
        ("model.image_widht", "model.image_width"),
        ("evals.shapes_zeroshot.batchsize", "evals.shapes_zeroshot.batch_size"),
    ],
)
def test_a_misspelt_key_is_named_with_the_closest_one(key, closest):
    message = config_keys.unknown_key_message(config_for("tiny"), key)
    assert f"did you mean --config.{closest}?" in message and "\n" not in message


def test_an_existing_key_is_not_a_typo():
    config = config_for("tiny")
    assert config_keys.unknown_key_message(config, "optim.lr") is None
    assert config_keys.unknown_override_message(config, ["--config.optim.lr=1"]) is None
