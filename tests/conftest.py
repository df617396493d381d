"""Test setup: 8 fake CPU devices, so sharding tests run on any laptop.

XLA reads the flag once, when jax first initialises its backend, so it is set here, before any test
module imports jax.
"""

import os

_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count=8"
if _DEVICE_COUNT_FLAG not in os.environ.get("XLA_FLAGS", "").split():  # once, even if inherited
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_DEVICE_COUNT_FLAG}".strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")


# Imported only now: jax must see XLA_FLAGS first.
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from absl import flags  # noqa: E402
from flax import linen as nn  # noqa: E402

from sycoca_jax.data import shapes_builder  # noqa: E402
from sycoca_jax.models import build  # noqa: E402
from tests.helpers import SMALL, config_for, random_tokens  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _absl_flags_parsed():
    """grain worker processes read absl flags; nothing parses them under pytest."""
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> str:
    """A data dir holding the small shapes build (never the user's ~/tensorflow_datasets)."""
    path = tmp_path_factory.mktemp("tfds")
    shapes_builder.prepare(SMALL, str(path))
    return str(path)


@pytest.fixture(scope="session")
def tiny_model_config():
    return config_for("tiny").model


@pytest.fixture(scope="session")
def tiny_model(tiny_model_config):
    return build.from_config(tiny_model_config)


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


@pytest.fixture(scope="session")
def tiny_pretrained(data_dir, tmp_path_factory):
    """60 steps of the tiny config on the small build (validation and checkpoints every 30,
    the config's downstream evals at the end, steps 41-42 profiled): (config, workdir, last
    logged metrics)."""
    from sycoca_jax import train
    from tests.helpers import tiny_config

    workdir = str(tmp_path_factory.mktemp("tiny_pretrained"))
    config = tiny_config(data_dir)
    config.total_steps = 60
    config.optim.warmup_steps = 10
    config.log_every_steps = 10
    config.eval_every_steps = 30
    config.eval_batches = 1
    config.checkpoint_every_steps = 30
    config.batch_size = 16
    config.profile_steps = "41,42"  # a trace of two steps (tests/test_main.py)
    for entry in config.evals.values():
        entry.batch_size = 64
    last = train.train_and_evaluate(config, workdir)
    return config, workdir, last
