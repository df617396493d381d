"""tools/convert_checkpoint: a converted checkpoint loads in evaluation and transfer at its new
layout and image size, round-trips through disk exactly, and never overwrites anything."""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from sycoca_jax import checkpoint as ckpt
from sycoca_jax import evaluate
from sycoca_jax.checkpoint_integrity import params_digest
from sycoca_jax.models import build
from sycoca_jax.tools import convert_checkpoint
from sycoca_jax.transfer import towers
from tests.helpers import ROOT, config_for

STEP = 7


@pytest.fixture(scope="module")
def source(tmp_path_factory, tiny_params):
    """A tiny (unrolled, 64 px) checkpoint as training writes it: state and config."""
    workdir = tmp_path_factory.mktemp("source")
    state = {"step": np.int32(STEP), "params": jax.device_get(tiny_params)}
    writer = ckpt.Checkpointer(str(workdir), async_save=False)
    writer.save(STEP, state, config=config_for("tiny"))
    writer.close()
    return str(workdir)


@pytest.fixture(scope="module")
def converted(source, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("converted") / "run")
    summary = convert_checkpoint.convert_checkpoint(source, out, layout="scan", image_size=96)
    assert summary["changed"] == {"scan": [False, True], "image_size": [64, 96]}
    return out


def test_converted_checkpoint_evaluates_at_the_new_size(converted):
    pretrained = towers.load_pretrained(converted)  # transfer reads the stored config
    assert pretrained.step == STEP
    assert (pretrained.model.scan, pretrained.model.image_size) == (True, 96)
    context, step = evaluate.load_for_eval(pretrained.config, converted)
    assert step == STEP
    images = np.random.default_rng(0).normal(size=(2, 96, 96, 3)).astype(np.float32)
    model = build.from_config(context.config.model)
    encoded = jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.encode_image))(
        context.params, images
    )
    assert encoded["patch_states"].shape == (2, (96 // model.patch_size) ** 2, model.image_width)
    embeddings = jax.jit(context.predictors.encode_images)(context.params, images)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=-1), 1.0, rtol=1e-5)


def test_layout_round_trip_through_disk_is_exact(source, tmp_path):
    scanned, unrolled = str(tmp_path / "scanned"), str(tmp_path / "unrolled")
    convert_checkpoint.convert_checkpoint(source, scanned, layout="scan")
    convert_checkpoint.convert_checkpoint(scanned, unrolled, layout="unrolled")
    original = ckpt.load_params(source)
    assert params_digest(ckpt.load_params(unrolled)) == params_digest(original)
    assert params_digest(ckpt.load_params(scanned)) != params_digest(original)


def test_refuses_to_overwrite(source, converted):
    before = params_digest(ckpt.load_params(converted))
    with pytest.raises(FileExistsError, match="not empty"):
        convert_checkpoint.convert_checkpoint(source, converted, layout="unrolled")
    assert params_digest(ckpt.load_params(converted)) == before


def test_a_size_the_patch_does_not_divide_is_named(source, tmp_path):
    with pytest.raises(ValueError, match="image_size 100 must be a positive multiple"):
        convert_checkpoint.convert_checkpoint(source, str(tmp_path / "out"), image_size=100)
    assert not (tmp_path / "out").exists()


def test_command_line(source, tmp_path):
    out = tmp_path / "cli"
    command = [
        sys.executable,
        "-m",
        "sycoca_jax.tools.convert_checkpoint",
        f"--checkpoint={source}",
        f"--out={out}",
        "--image_size=128",
        "--resample=bicubic",
    ]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["changed"] == {"image_size": [64, 128]}
    stored = ckpt.Checkpointer(str(out), async_save=False)
    config = ml_collections.ConfigDict(stored.restore_config(STEP))
    stored.close()
    assert (config.model.image_size, config.model.scan) == (128, False)
    again = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert again.returncode == 1
    assert "not empty; give a new folder" in again.stderr and "Traceback" not in again.stderr
