"""config.data, the benchmark, the shapes CLI and checkpointing the iterator with Orbax."""

from __future__ import annotations

import grain
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from sycoca_jax.data import benchmark, pipeline, prepare
from tests.helpers import ROOT, tiny_config


def _load(arg: str):
    from sycoca_jax.config_args import load_config

    return load_config(f"{ROOT / 'configs' / 'sycoca.py'}:{arg}")


def test_data_configs():
    tiny = _load("tiny")
    assert tiny.data.name == "sycoca_shapes" and tiny.batch_size == 32
    assert tiny.data.tokenizer is None and tiny.data.data_dir is None
    assert "image_size" not in tiny.data and "max_text_len" not in tiny.data
    assert {e.kind for e in tiny.evals.values()} == {
        "retrieval",
        "captioning",
        "zeroshot",
        "mechanism",
    }
    cc3m = _load("size=B/16,data=cc3m")
    assert cc3m.data.name == "cc3m" and cc3m.batch_size == 2048
    assert cc3m.data.prefetch == "process" and cc3m.data.eval_split == "validation"
    assert cc3m.evals.coco_retrieval.dataset == "coco_captions"
    assert cc3m.evals.imagenet_zeroshot.split == "validation"
    cc12m = _load("size=B/16,data=cc12m")
    assert cc12m.data.eval_split is None
    cc12m.data.tokenizer = "/data/spm64k.model"  # placeholders accept overrides
    cc12m.data.data_dir = "gs://bucket/tfds"
    with pytest.raises(ValueError, match="unknown data"):
        _load("data=laion")


def test_benchmark_measures_the_pipeline(data_dir):
    result = benchmark.measure(tiny_config(data_dir), num_batches=3, warmup_batches=1)
    assert result["examples_per_s"] > 0
    assert result["host_batch_size"] == 32
    # Inline reading: the CPU time is this process's, at most a core and a bit (other threads).
    assert 0 < result["cpu_cores_busy"] < 2.5
    assert result["examples_per_cpu_s"] == pytest.approx(
        result["examples_per_s"] / result["cpu_cores_busy"]
    )


def test_benchmark_cpu_time_counts_worker_processes():
    """A child that burns CPU while this process sleeps is counted (grain workers are children)."""
    import subprocess
    import sys
    import time

    import psutil

    me = psutil.Process()
    before = benchmark.cpu_seconds(me)
    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.4: pass\n"
    child = subprocess.Popen([sys.executable, "-c", burn + "time.sleep(30)"])
    try:
        deadline = time.monotonic() + 20
        while benchmark.cpu_seconds(me) - before < 0.4 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert benchmark.cpu_seconds(me) - before >= 0.4
    finally:
        child.kill()
        child.wait()


def test_cores_needed():
    assert benchmark.cores_needed(4500, 700) == 13  # 9000 / 700 = 12.9
    assert benchmark.cores_needed(700, 700, headroom=1) == 1
    assert benchmark.cores_needed(769, 700, headroom=2) == 3


def test_prepare_shapes_cli(tmp_path, capsys):
    prepare.main(
        [
            "shapes",
            f"--data_dir={tmp_path}",
            "--image_size=32",
            "--num_train=8",
            "--num_validation=2",
            "--num_test=2",
        ]
    )
    assert "sycoca_shapes/32px_train8_val2_test2_seed0 ready" in capsys.readouterr().out
    assert (tmp_path / "sycoca_shapes" / "32px_train8_val2_test2_seed0" / "1.0.0").is_dir()


def test_iterator_checkpoints_with_orbax_next_to_the_train_state(data_dir, tmp_path):
    config = tiny_config(data_dir, num_workers=1)
    iterator = pipeline.make_train_iterator(config)
    for _ in range(3):
        next(iterator)
    state = {"params": {"w": jnp.arange(4.0)}, "step": 3}
    manager = ocp.CheckpointManager(tmp_path / "ckpt")
    manager.save(
        3,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data_iter=grain.checkpoint.CheckpointSave(iterator)
        ),
    )
    manager.wait_until_finished()
    expected = [next(iterator) for _ in range(2)]
    iterator.close()

    fresh = pipeline.make_train_iterator(config)
    restored = manager.restore(
        manager.latest_step(),
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(state),
            data_iter=grain.checkpoint.CheckpointRestore(fresh),
        ),
    )
    assert restored.data_iter is fresh and fresh.stats.examples == 96
    np.testing.assert_array_equal(restored.state["params"]["w"], state["params"]["w"])
    for want in expected:
        got = next(fresh)
        np.testing.assert_array_equal(got["image"], want["image"])
        np.testing.assert_array_equal(got["tokens"], want["tokens"])
    fresh.close()
    manager.close()
