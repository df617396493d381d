"""The jitted train step: sharded == single device, gradients where they must (not) flow,
CoCa/CLIP presets, microbatching, and errors raised before compiling."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sycoca_jax import losses, sharding, train
from tests.helpers import config_for, random_tokens


def small_config(arg: str = "tiny", batch_size: int = 16):
    """The tiny config with one layer per tower, so each compile takes seconds."""
    config = config_for(arg)
    m = config.model
    m.image_depth = m.text_depth = m.multimodal_depth = m.decoder_depth = 1
    config.batch_size = batch_size
    config.total_steps = 10
    config.optim.warmup_steps = 2
    return config


def synthetic_batch(config, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    m = config.model
    images = rng.integers(0, 256, (config.batch_size, m.image_size, m.image_size, 3), np.uint8)
    tokens = random_tokens(rng, config.batch_size, m.max_text_len, 64)
    return {"image": images, "tokens": tokens}


def run_steps(config, mesh_shape, num_steps: int = 3, devices=None, initial=None):
    """``num_steps`` steps from ``initial`` (a host copy of a state; default: a fresh one)."""
    config.mesh.shape = mesh_shape
    mesh = sharding.make_mesh(mesh_shape, devices)
    setup = train.make_setup(config, mesh, None)
    if initial is None:
        state = train.initial_state(setup, seed=0)
    else:
        state = jax.device_put(initial, setup.state_shardings)
    compiled, _ = train.compile_train_step(setup)
    history = []
    for i in range(num_steps):
        batch = jax.device_put(synthetic_batch(config, seed=i), setup.placement.batch_sharding)
        state, metrics = compiled(state, batch)
        history.append({k: float(v) for k, v in metrics.items()})
    return jax.device_get(state), history


@pytest.fixture(scope="module")
def single_device_run():
    config = small_config()
    config.mesh.rules = "fsdp_tensor"
    return run_steps(config, (1, 1, 1), devices=jax.devices()[:1])


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 4, 1), (2, 2, 2)])
def test_sharded_step_equals_single_device(single_device_run, mesh_shape, capfd):
    config = small_config()
    config.mesh.rules = "fsdp_tensor"
    state, history = run_steps(config, mesh_shape)
    # XLA's partitioner warns (on stderr) when it must replicate a tensor to reshard it.
    assert "Involuntary full rematerialization" not in capfd.readouterr().err
    reference_state, reference_history = single_device_run
    assert int(state["step"]) == 3
    for name in ("loss", "loss/itc", "loss/caption", "loss/tgmim"):
        np.testing.assert_allclose(
            [h[name] for h in history], [h[name] for h in reference_history], rtol=2e-5
        )
    flat = jax.tree_util.tree_flatten_with_path(state["params"])[0]
    reference = jax.tree.leaves(reference_state["params"])
    for (path, got), want in zip(flat, reference, strict=True):
        name = jax.tree_util.keystr(path)
        if name.endswith("['key']['bias']"):
            # A key bias shifts every logit of a query's softmax equally: its gradient is zero
            # but for rounding, which Adam turns into steps of either sign. Both runs keep it
            # near its zero start; the rounding (and so the sign) depends on the layout.
            assert np.abs(got).max() < 1e-5 and np.abs(want).max() < 1e-5, name
            continue
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-6, err_msg=name)


def test_tgmim_guides_text_and_scores_pass_no_gradient(tiny_model, tiny_params, tiny_inputs):
    images, tokens = tiny_inputs

    def outputs(params):
        return tiny_model.apply(
            {"params": params}, images, tokens, rngs={"masking": jax.random.key(0)}
        )

    def tgmim(params):
        out = outputs(params)
        return losses.tgmim_loss(out["tgmim_prediction"], out["tgmim_target"], out["tgmim_mask"])

    grads = jax.jit(jax.grad(tgmim))(tiny_params)
    text_grad = sum(float(jnp.abs(g).sum()) for g in jax.tree.leaves(grads["text_encoder"]))
    assert text_grad > 1e-3, "TG-MIM loss does not reach the text tower"
    score_grads = jax.jit(jax.grad(lambda p: outputs(p)["relevance"].sum()))(tiny_params)
    assert all(not np.asarray(g).any() for g in jax.tree.leaves(score_grads))


@pytest.mark.parametrize("objective", ["coca", "clip"])
def test_baselines_train_from_the_same_code(objective):
    config = small_config(f"tiny,objective={objective}")
    config.optim.lr = 3e-3
    config.mesh.shape = (-1, 1, 1)
    mesh = sharding.make_mesh(config.mesh.shape)
    setup = train.make_setup(config, mesh, None)
    state = train.initial_state(setup, 0)
    compiled, _ = train.compile_train_step(setup)
    batch = jax.device_put(synthetic_batch(config), setup.placement.batch_sharding)
    losses_seen = []
    for _ in range(8):
        state, metrics = compiled(state, batch)
        losses_seen.append(float(metrics["loss"]))
    assert ("loss/caption" in metrics) == (objective == "coca")
    assert "loss/tgmim" not in metrics
    assert losses_seen[-1] < losses_seen[0] - 0.1, losses_seen


def test_microbatches_match_the_full_batch_for_per_example_losses():
    """With only TG-MIM (a mean over equally many masked patches per example), k microbatches
    give exactly the full-batch gradient; ITC would not (fewer negatives per microbatch)."""
    results, initial = [], None
    for k in (1, 2):
        config = small_config()
        config.loss.itc_weight = config.loss.caption_weight = 0.0
        config.microbatches = k
        if initial is None:  # one initialisation (one compilation) serves both runs
            config.mesh.shape = (-1, 1, 1)
            setup = train.make_setup(config, sharding.make_mesh((-1, 1, 1)), None)
            initial = jax.device_get(train.initial_state(setup, seed=0))
        state, history = run_steps(config, (-1, 1, 1), num_steps=2, initial=initial)
        results.append((state, history))
    (s1, h1), (s2, h2) = results
    np.testing.assert_allclose(h2[0]["loss"], h1[0]["loss"], rtol=1e-5)
    np.testing.assert_allclose(h2[0]["grad_norm"], h1[0]["grad_norm"], rtol=1e-4)
    for a, b in zip(jax.tree.leaves(s1["params"]), jax.tree.leaves(s2["params"]), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)


def test_bad_batch_or_mesh_fails_before_compiling():
    config = small_config(batch_size=12)
    with pytest.raises(ValueError, match="not divisible by the data-parallel size"):
        train.make_setup(config, sharding.make_mesh((8, 1, 1)), None)
    with pytest.raises(ValueError, match="needs 4 devices but 8 are present"):
        sharding.make_mesh((4, 1, 1))
    config = small_config()
    config.loss.tgmim_weight = 1.0
    config.model.use_tgmim = False
    with pytest.raises(ValueError, match="use_tgmim is False"):
        train.make_setup(config, sharding.make_mesh((8, 1, 1)), None)


def test_non_finite_loss_names_step_and_term():
    with pytest.raises(train.NonFiniteLossError, match=r"loss/caption is nan at step 7"):
        train.check_finite(7, {"loss": float("nan"), "loss/itc": 1.0, "loss/caption": float("nan")})
    train.check_finite(1, {"loss": 1.0, "grad_norm": float("inf")})


def test_caption_only_training_warns_that_the_contrastive_head_drifts(caplog):
    config = small_config("tiny,objective=coca")
    config.loss.itc_weight = 0.0
    with caplog.at_level("WARNING"):
        train.make_setup(config, sharding.make_mesh((8, 1, 1)), None)
    assert any("contrastive head drifts" in r.getMessage() for r in caplog.records)
