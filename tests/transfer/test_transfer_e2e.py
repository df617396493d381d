"""End to end: a short tiny pretraining, then the linear probe (through the CLI), the fine-tuned
classifier and VQA from its checkpoint; each writes its results and checkpoint and (on the data
it trained on) beats chance."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from sycoca_jax import checkpoint as ckpt
from sycoca_jax import checkpoint_integrity, sharding, train
from sycoca_jax.config_args import load_config
from sycoca_jax.data.skipping import SkipCountingIterator
from sycoca_jax.metrics import read_metrics
from sycoca_jax.transfer import results, towers
from sycoca_jax.transfer import run as transfer_run
from tests.helpers import ROOT, SMALL_NAME, tiny_config

TRANSFER = str(ROOT / "configs" / "transfer.py")


@pytest.fixture(scope="module")
def pretrained(data_dir, tmp_path_factory):
    """20 steps of a depth-1 tiny SyCoCa, batch 16, one checkpoint at the end."""
    workdir = str(tmp_path_factory.mktemp("pretrained"))
    config = tiny_config(data_dir)
    for field in ("image_depth", "text_depth", "multimodal_depth", "decoder_depth"):
        config.model[field] = 1
    config.total_steps = 20
    config.optim.warmup_steps = 5
    config.batch_size = 16
    config.log_every_steps = 10
    config.eval_every_steps = 0
    config.checkpoint_every_steps = 20
    for entry in config.get("evals", {}).values():
        entry.every_steps = 0
    train.train_and_evaluate(config, workdir)
    return workdir


def transfer_config(task: str, data_dir: str, init: str, steps: int = 30):
    config = load_config(f"{TRANSFER}:task={task}")
    config.init = init
    config.data.name = SMALL_NAME
    config.data.data_dir = data_dir
    config.data.num_workers = 0
    config.data.eval_splits = ("train", "validation")
    config.eval_batch_size = 32
    config.batch_size = 16
    config.total_steps = steps
    config.optim.warmup_steps = 5
    config.optim.lr = 3e-3
    config.optim.tower_lr = 1e-3
    config.log_every_steps = 10
    return config


def check_written(workdir: str, task: str, pretrained: str, step: int) -> dict:
    out = results.read_results(workdir)
    assert out["task"] == task
    assert out["checkpoint"]["step"] == 20
    assert out["checkpoint"]["path"] == str(ckpt.checkpoint_dir(pretrained))
    assert out["config"]["init"] == pretrained
    checkpointer = ckpt.Checkpointer(workdir, async_save=False)
    assert list(checkpointer.all_steps()) == [step]
    checkpointer.close()
    return out


def test_linear_probe_through_the_cli(pretrained, data_dir, tmp_path):
    workdir = str(tmp_path / "probe")
    command = [
        sys.executable, "-m", "sycoca_jax.transfer", f"--config={TRANSFER}:linear_probe",
        f"--init={pretrained}", f"--workdir={workdir}", f"--config.data.name={SMALL_NAME}",
        f"--config.data.data_dir={data_dir}", "--config.data.num_workers=0",
        "--config.data.eval_splits=('train','test')", "--config.eval_batch_size=32",
        "--config.linear_probe.steps=100",
    ]  # fmt: skip
    # One CPU device (not the 8 fake ones of the test session): a smaller program to compile.
    flags = " ".join(
        f
        for f in os.environ.get("XLA_FLAGS", "").split()
        if not f.startswith("--xla_force_host_platform_device_count")
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags)
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = check_written(workdir, "linear_probe", pretrained, 0)
    assert out["feature"] == "mean_patch+embedding" and out["feature_dim"] == 128
    assert len(out["validation_top1_per_l2"]) == len(out["l2_grid"])
    train_split = out["splits"]["train"]
    assert train_split["examples"] == 96 and out["splits"]["test"]["examples"] == 40
    assert train_split["top1"] > 2 * train_split["chance"]["majority_class"]
    assert 0 <= out["splits"]["test"]["top1"] <= 1


@pytest.fixture(scope="module")
def finetuned(pretrained, data_dir, tmp_path_factory):
    """30 uninterrupted steps of the fine-tuned classifier: (workdir, results)."""
    workdir = str(tmp_path_factory.mktemp("finetune"))
    return workdir, transfer_run.run(transfer_config("finetune", data_dir, pretrained), workdir)


def test_finetune(pretrained, finetuned):
    workdir, out = finetuned
    assert check_written(workdir, "finetune", pretrained, 30)["splits"] == out["splits"]
    assert out["num_classes"] == 30
    train_split, validation = out["splits"]["train"], out["splits"]["validation"]
    assert train_split["examples"] == 96 and validation["examples"] == 20
    assert train_split["top1"] > 2 * train_split["chance"]["majority_class"]
    assert train_split["top5"] >= train_split["top1"]
    records = [r for r in read_metrics(workdir) if "loss" in r]
    assert [r["step"] for r in records] == [1, 10, 20, 30]
    assert records[-1]["loss"] < records[0]["loss"]
    tower = ckpt.load_params(workdir, ("tower", "image_encoder"))
    before = ckpt.load_params(pretrained, "image_encoder")
    assert not (tower["patch_embedding"]["kernel"] == before["patch_embedding"]["kernel"]).all()


STOP_STEP = 13  # neither a logging nor a checkpoint step
PREFETCH = 2  # TrainLoop's default device_prefetch: batch k is drawn while step k - 2 runs


def test_a_stopped_finetune_resumes_to_the_same_result(
    pretrained, finetuned, data_dir, tmp_path, monkeypatch
):
    """SIGTERM during step 13 (while the batch of step 15 is prefetched): the loop saves step
    13 and leaves without results; the same call then resumes from the workdir and ends exactly
    where the uninterrupted run did (parameters, data order, losses, accuracies): the two
    prefetched batches are not counted as consumed."""
    straight, straight_out = finetuned
    workdir = str(tmp_path / "stopped")
    config = transfer_config("finetune", data_dir, pretrained)
    draw = SkipCountingIterator.__next__
    drawn = []

    def draw_with_sigterm(self):
        drawn.append(1)
        if len(drawn) == STOP_STEP + PREFETCH:
            os.kill(os.getpid(), signal.SIGTERM)  # the loop's handler, as from a scheduler
        return draw(self)

    monkeypatch.setattr(SkipCountingIterator, "__next__", draw_with_sigterm)
    assert transfer_run.run(config, workdir) == {}
    monkeypatch.undo()
    assert not os.path.exists(os.path.join(workdir, results.RESULTS_FILE))
    assert _steps(workdir) == [STOP_STEP]

    out = transfer_run.run(config, workdir)
    assert _steps(workdir) == [STOP_STEP, 30]
    digest = checkpoint_integrity.params_digest(ckpt.load_params(workdir))
    assert digest == checkpoint_integrity.params_digest(ckpt.load_params(straight))
    assert out["splits"] == straight_out["splits"]
    logged, expected = _train_records(workdir), _train_records(straight)
    assert sorted(logged) == [1, 10, 20, 30]
    for step in logged:
        for key in ("loss", "accuracy", "data/batch_fingerprint"):
            assert logged[step][key] == expected[step][key], (step, key)


def _steps(workdir: str) -> list[int]:
    checkpointer = ckpt.Checkpointer(workdir, async_save=False)
    steps = list(checkpointer.all_steps())
    checkpointer.close()
    return steps


def _train_records(workdir: str) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(workdir) if "loss" in r}


def test_vqa_with_caption_cotraining(pretrained, data_dir, tmp_path):
    workdir = str(tmp_path / "vqa")
    config = transfer_config("vqa", data_dir, pretrained)
    config.vqa.caption_weight = 0.5
    out = transfer_run.run(config, workdir)
    check_written(workdir, "vqa", pretrained, 30)
    vocab = results.read_results(workdir)["answer_vocab_size"]
    assert 10 < vocab <= 23 and os.path.exists(os.path.join(workdir, "answer_vocab.json"))
    train_split = out["splits"]["train"]
    assert train_split["questions"] == 4 * 96
    assert set(train_split["by_slot"]) == {"colour", "kind", "count", "position"}
    # 30 steps learn which answers go with which question (the per-slot prior, a blind
    # baseline, is about as good); the full-size run beats it (configs/transfer.py).
    assert train_split["accuracy"] > 2 * train_split["chance"]["most_frequent_answer"]
    assert train_split["chance"]["per_slot_prior"] > train_split["chance"]["uniform"]
    last = [r for r in read_metrics(workdir) if "loss" in r][-1]
    assert {"loss/vqa", "loss/caption", "accuracy/vqa"} <= set(last)


def test_question_states_are_what_the_vocabulary_projection_reads(pretrained):
    model = towers.load_pretrained(pretrained).model
    tower = {name: ckpt.load_params(pretrained, name) for name in towers.VQA_SUBTREES}
    rng = np.random.default_rng(0)
    images = rng.normal(size=(2, model.image_size, model.image_size, 3)).astype(np.float32)
    tokens = np.zeros((2, 3, model.max_text_len + 1), np.int32)
    tokens[..., 0], tokens[..., 1:4], tokens[..., 4] = 1, 7, 2  # [bos, 7, 7, 7, eos, pad...]
    out = jax.jit(lambda t, i, q: towers.question_states(model, t, i, q, qa_tokens=q))(
        tower, images, tokens
    )
    b_q, length = 6, model.max_text_len
    assert out["states"].shape == (b_q, length, model.text_width)
    assert out["valid"].shape == (b_q, length) and out["valid"][:, :5].all()
    assert not out["valid"][:, 5:].any()
    dense = tower["multimodal_decoder"]["logits"]
    logits = out["states"] @ dense["kernel"] + dense["bias"]
    np.testing.assert_allclose(logits, out["qa_logits"], atol=1e-4)  # same tokens: same logits
    assert out["qa_targets"].shape == (b_q, length)


def test_transfer_may_change_how_the_model_computes_not_what(pretrained):
    overrides = {"dtype": "bfloat16", "remat": "full", "scan_unroll": 0, "attention_impl": None}
    model = towers.load_pretrained(pretrained, overrides=overrides).model
    assert (model.dtype, model.remat, model.scan_unroll) == ("bfloat16", "full", 0)
    assert model.attention_impl == "xla"  # None keeps the checkpoint's
    with pytest.raises(ValueError, match="'text_width' cannot change in transfer"):
        towers.load_pretrained(pretrained, overrides={"text_width": 8})


def test_a_missing_or_wrong_checkpoint_is_named(tmp_path, data_dir):
    config = transfer_config("finetune", data_dir, None)
    with pytest.raises(ValueError, match="--init"):
        transfer_run.run(config, str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        towers.load_pretrained(str(tmp_path / "nowhere"))


def test_caption_finetune_config_starts_from_every_pretrained_part(pretrained, data_dir):
    config = load_config(f"{ROOT / 'configs' / 'caption_finetune.py'}:tiny")
    loss = config.loss
    assert loss.itc_weight == 0 and loss.caption_weight == 1 and loss.tgmim_weight == 0
    assert not config.model.use_tgmim and config.model.caption_masking == "none"
    assert load_config(f"{ROOT / 'configs' / 'caption_finetune.py'}:itc_weight=0.1").loss.itc_weight
    config.data.name, config.data.data_dir = SMALL_NAME, data_dir
    for field in ("image_depth", "text_depth", "multimodal_depth"):
        config.model[field] = 1
    config.init.checkpoint = pretrained
    setup = train.make_setup(config, sharding.Placement.from_config(config.mesh), None)
    params = setup.abstract_state["params"]
    assert set(params) == set(config.init.subtrees)  # every part of the model, no TG-MIM decoder
    for name in config.init.subtrees:  # what train.transfer_init checks before copying
        assert not ckpt.describe_mismatch(params[name], ckpt.load_params(pretrained, name))
