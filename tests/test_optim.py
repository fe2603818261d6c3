"""The optimizer: decay mask, schedule values, non-finite steps, accumulation; the step's
GPU compiler options."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxgpt2.config import OptimConfig
from jaxgpt2.optim import Optimizer, build_optimizer, learning_rate_schedule, weight_decay_mask
from jaxgpt2.step import (GPU_COMPILER_OPTIONS, create_train_state, make_train_step,
                          step_compiler_options)


def test_decay_mask_covers_exactly_weight_matrices_and_embeddings(small_model):
    _, params = small_model
    mask = weight_decay_mask(params)
    flat = {jax.tree_util.keystr(path): leaf for path, leaf in
            jax.tree_util.tree_flatten_with_path(mask)[0]}
    decayed = sorted(k for k, v in flat.items() if v)
    assert decayed == sorted([
        "['h']['attn']['c_attn']['kernel']", "['h']['attn']['c_proj']['kernel']",
        "['h']['mlp']['c_fc']['kernel']", "['h']['mlp']['c_proj']['kernel']",
        "['wpe']['embedding']", "['wte']['embedding']"])
    # Everything else is a bias or a LayerNorm parameter.
    for key, value in flat.items():
        if not value:
            assert key.endswith("['bias']']") or "['bias']" in key or "['scale']" in key, key


def test_weight_decay_moves_only_masked_parameters():
    params = {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,))},
              "ln": {"scale": jnp.ones((2,))}}
    cfg = OptimConfig(lr=0.1, min_lr=0.1, warmup_steps=0, weight_decay=0.5, schedule="constant")
    tx = build_optimizer(cfg, max_steps=10)
    zeros = jax.tree.map(jnp.zeros_like, params)
    state = tx.init(params)
    for _ in range(2):  # the first update of a 0-warmup constant schedule is at lr
        updates, state = tx.update(zeros, state, params)
        params = optax.apply_updates(params, updates)
    assert float(params["dense"]["kernel"][0, 0]) < 1.0
    assert float(params["dense"]["bias"][0]) == 1.0
    assert float(params["ln"]["scale"][0]) == 1.0


def test_schedule_values_at_warmup_end_midpoint_and_end():
    cfg = OptimConfig(lr=6e-4, min_lr=6e-5, warmup_steps=100, decay_steps=1100)
    schedule = learning_rate_schedule(cfg, max_steps=5000)
    assert float(schedule(0)) == 0.0
    np.testing.assert_allclose(schedule(50), 3e-4, rtol=1e-6)
    np.testing.assert_allclose(schedule(100), 6e-4, rtol=1e-6)
    # Halfway through the cosine the rate is the mean of peak and floor.
    np.testing.assert_allclose(schedule(600), (6e-4 + 6e-5) / 2, rtol=1e-5)
    np.testing.assert_allclose(schedule(1100), 6e-5, rtol=1e-6)
    np.testing.assert_allclose(schedule(3000), 6e-5, rtol=1e-6)


def _batch(rng, accum, rows, T=16, vocab=100):
    ids = rng.integers(0, vocab, (accum, rows, T + 1)).astype(np.int32)
    return {"input_ids": ids[..., :-1], "targets": ids[..., 1:],
            "loss_mask": np.ones((accum, rows, T), np.float32)}


def test_nan_gradient_step_leaves_params_and_moments_unchanged(small_model):
    model, params = small_model
    cfg = OptimConfig(warmup_steps=0)
    tx = build_optimizer(cfg, 10)
    step = jax.jit(make_train_step(model, tx, debug_nan_steps=(1,)))
    state = create_train_state(params, tx, 0)
    batch = _batch(np.random.default_rng(0), 1, 4)
    state, m0 = step(state, batch)
    assert bool(m0["applied"])
    before = jax.device_get(state)
    state, m1 = step(state, batch)
    after = jax.device_get(state)
    assert not bool(m1["applied"])
    for a, b in zip(jax.tree.leaves(before.params), jax.tree.leaves(after.params)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(before.opt_state.inner_state),
                    jax.tree.leaves(after.opt_state.inner_state)):
        np.testing.assert_array_equal(a, b)
    assert int(after.opt_state.notfinite_count) == 1
    assert int(after.opt_state.total_notfinite) == 1
    state, m2 = step(state, batch)
    assert bool(m2["applied"]) and int(state.opt_state.notfinite_count) == 0
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(state.params)))


def test_accumulating_four_micro_batches_equals_one_big_batch(small_model):
    # Plain SGD makes the update proportional to the gradient, so comparing parameters
    # compares gradients (Adam's first step is lr * sign(g) and hides differences).
    model, params = small_model
    tx = Optimizer.guard(optax.sgd(1.0), optax.constant_schedule(1.0))
    step = jax.jit(make_train_step(model, tx))
    big = _batch(np.random.default_rng(1), 1, 8)
    big["loss_mask"][0, 3, 5:] = 0  # uneven real-token counts across micro-batches
    micro = jax.tree.map(lambda x: x.reshape(4, 2, -1), big)
    s_big, m_big = step(create_train_state(params, tx, 0), big)
    s_micro, m_micro = step(create_train_state(params, tx, 0), micro)
    np.testing.assert_allclose(m_big["loss"], m_micro["loss"], rtol=1e-5)
    np.testing.assert_allclose(m_big["grad_norm"], m_micro["grad_norm"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(s_big.params), jax.tree.leaves(s_micro.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_gpu_step_options_are_names_xla_knows_and_apply_only_on_a_gpu():
    """A misspelt option would fail only on a GPU's first step; XLA's CPU client checks the
    same option names."""
    assert jax.jit(lambda x: x * 2, compiler_options=GPU_COMPILER_OPTIONS)(1.5) == 3.0
    with pytest.raises(Exception, match="xla_gpu_no_such_option"):
        jax.jit(lambda x: x * 2, compiler_options={"xla_gpu_no_such_option": 0})(1.5)
    assert step_compiler_options() == ({} if jax.default_backend() != "gpu"
                                       else GPU_COMPILER_OPTIONS)
