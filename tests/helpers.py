"""Helpers shared by tests: the repository root, config loading, random captions, running a
binary."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import numpy as np

from sycoca_jax.config_args import load_config
from sycoca_jax.data import shapes_builder

ROOT = pathlib.Path(__file__).resolve().parents[1]


def config_for(arg: str):
    return load_config(f"{ROOT / 'configs' / 'sycoca.py'}:{arg}")


def random_tokens(rng: np.random.Generator, batch: int, length: int, vocab: int) -> np.ndarray:
    """Right-padded captions [bos, words..., eos, pad...] of random lengths; (batch, length+1)."""
    tokens = np.zeros((batch, length + 1), np.int32)
    for b in range(batch):
        n = int(rng.integers(2, length - 1))
        tokens[b, 0] = 1
        tokens[b, 1 : n + 1] = rng.integers(4, vocab, size=n)
        tokens[b, n + 1] = 2
    return tokens


# A small build of the embedded dataset, shared by every test session (see tests/conftest.py).
SMALL = shapes_builder.shapes_config(image_size=64, num_train=96, num_validation=20, num_test=40)
SMALL_NAME = f"sycoca_shapes/{SMALL.name}"


def tiny_config(data_dir: str, arg: str = "tiny", **data_overrides):
    """configs/sycoca.py:<arg> reading the small build, inline data loading."""
    config = config_for(arg)
    config.data.name = SMALL_NAME
    config.data.data_dir = data_dir
    config.data.num_workers = 0
    for key, value in data_overrides.items():
        config.data[key] = value
    return config


def run_module(module: str, *args: str, cwd) -> subprocess.CompletedProcess:
    """``python -m module args`` on the CPU (one device), this checkout first on the path."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def one_error_line(result: subprocess.CompletedProcess, program: str) -> str:
    """The one ``<program>: error:`` line of stderr; there is no traceback."""
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if f"{program}: error:" in line]
    assert len(lines) == 1, result.stderr[-3000:]
    return lines[0]
