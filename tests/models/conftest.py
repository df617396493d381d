"""Shared fixtures for model tests: the tiny config and small random inputs."""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from sycoca_jax.config_args import load_config
from sycoca_jax.models import sycoca

ROOT = pathlib.Path(__file__).resolve().parents[2]


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


@pytest.fixture(scope="session")
def tiny_model_config():
    return config_for("tiny").model


@pytest.fixture(scope="session")
def tiny_model(tiny_model_config):
    return sycoca.from_config(tiny_model_config)


@pytest.fixture(scope="session")
def tiny_inputs(tiny_model):
    rng = np.random.default_rng(0)
    images = rng.normal(size=(3, tiny_model.image_size, tiny_model.image_size, 3)).astype(
        np.float32
    )
    tokens = random_tokens(rng, 3, tiny_model.max_text_len, tiny_model.vocab_size)
    return jnp.asarray(images), jnp.asarray(tokens)


@pytest.fixture(scope="session")
def tiny_params(tiny_model, tiny_inputs):
    images, tokens = tiny_inputs
    variables = jax.jit(tiny_model.init)(
        {"params": jax.random.key(0), "masking": jax.random.key(1)}, images, tokens
    )
    return nn.unbox(variables["params"])
