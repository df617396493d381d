"""Resuming with a changed config: fields that make it another run are refused, naming each
old → new and the flag that accepts them; safe changes come back for logging; the saved config
(JSON, through the real Checkpointer) compares equal to the config that wrote it."""

from __future__ import annotations

import jax.numpy as jnp
import pytest

from sycoca_jax import checkpoint as ckpt
from sycoca_jax.config_diff import ConfigChangedError, diff_on_resume
from sycoca_jax.errors import ConfigError
from sycoca_jax.metrics import MetricWriter, read_metrics
from tests.helpers import config_for


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict:
    """The tiny config as a checkpoint stores it (JSON: tuples become lists)."""
    workdir = str(tmp_path_factory.mktemp("saved_config"))
    checkpointer = ckpt.Checkpointer(workdir, async_save=False)
    checkpointer.save(1, {"step": jnp.zeros((), jnp.int32)}, config=config_for("tiny"))
    checkpointer.wait()
    config = checkpointer.restore_config(1)
    checkpointer.close()
    return config


def test_the_same_config_is_no_change(saved):
    assert not diff_on_resume(saved, config_for("tiny"))


def test_a_changed_batch_size_is_refused_naming_the_field_and_the_flag(saved):
    config = config_for("tiny")
    config.batch_size = 64
    with pytest.raises(ConfigChangedError) as error:
        diff_on_resume(saved, config)
    message = str(error.value)
    assert "batch_size 32 → 64" in message and "\n" not in message
    assert "--config.allow_config_change=batch_size" in message


def test_every_field_the_review_resumed_silently_is_refused_at_once(saved):
    config = config_for("tiny")
    config.data.shuffle_seed = 7
    config.optim.lr = 1e-3
    config.data.name = "cc3m"
    config.seed = 3
    config.loss.caption_weight = 1.0
    with pytest.raises(ConfigChangedError) as error:
        diff_on_resume(saved, config)
    message = str(error.value)
    for change in (
        'data.name "sycoca_shapes" → "cc3m"',
        "data.shuffle_seed 0 → 7",
        "optim.lr 0.002 → 0.001",
        "seed 0 → 3",
        "loss.caption_weight 2.0 → 1.0",
    ):
        assert change in message, message
    assert "allow_config_change=data.name,data.shuffle_seed,loss.caption_weight,optim.lr,seed" in (
        message
    )


def test_safe_changes_are_returned_for_logging(saved):
    config = config_for("tiny")
    config.total_steps = 3000
    config.log_every_steps = 10
    config.checkpoint_every_steps = 100
    config.keep_checkpoints = 5
    config.evals.shapes_zeroshot.every_steps = 0
    config.mesh.shape = (2, 2, 2)
    config.model.scan_unroll = 0  # how the layers compile, the same parameters
    diff = diff_on_resume(saved, config)
    assert {c.field for c in diff.safe} == {
        "total_steps",
        "log_every_steps",
        "checkpoint_every_steps",
        "keep_checkpoints",
        "evals.shapes_zeroshot.every_steps",
        "mesh.shape",
        "model.scan_unroll",
    }
    assert not diff.accepted and "total_steps 1500 → 3000" in diff.describe()


def test_allowed_changes_are_accepted_and_recorded(saved, tmp_path):
    config = config_for("tiny")
    config.optim.lr = 1e-3
    config.optim.b2 = 0.95
    config.batch_size = 64
    config.allow_config_change = "optim, batch_size"  # a prefix accepts its whole subtree
    diff = diff_on_resume(saved, config)
    assert [c.field for c in diff.accepted] == ["batch_size", "optim.b2", "optim.lr"]
    record = diff.record()
    assert record["config_change"]["accepted"]["optim.lr"] == [0.002, 0.001]
    writer = MetricWriter(str(tmp_path), enabled=True, tensorboard=False)
    writer.write(7, record)
    assert read_metrics(str(tmp_path)) == [{"step": 7, **record}]


def test_accepting_a_field_no_config_has_is_a_typo(saved):
    config = config_for("tiny")
    config.allow_config_change = "batchsize"
    with pytest.raises(ConfigError, match="'batchsize', which no config has; did you mean"):
        diff_on_resume(saved, config)


def test_fields_only_one_side_has_are_schema_changes(saved):
    older = {key: value for key, value in saved.items() if key != "microbatches"}
    diff = diff_on_resume(older, config_for("tiny"))
    assert [(c.field, c.new) for c in diff.schema] == [("microbatches", 1)]
