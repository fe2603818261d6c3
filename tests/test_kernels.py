"""The fused Pallas kernels (``model.kernels=pallas``) against XLA's ops, through Pallas's
interpreter on the CPU: the same kernel code a GPU compiles through Triton. The GPU run of
the same comparisons is ``tests/gpu_kernels.py``."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt2.kernels import bias_gelu, cross_entropy, layer_norm
from jaxgpt2.loss import token_nll
from jaxgpt2.model import GPT, KVCache
from jaxgpt2.step import create_train_state, make_train_step
from jaxgpt2.optim import build_optimizer
from jaxgpt2.config import OptimConfig


def _value_and_grads(fn, *args):
    weights = jax.random.normal(jax.random.PRNGKey(9), jax.eval_shape(fn, *args).shape)
    total = lambda *a: jnp.sum(fn(*a).astype(jnp.float32) * weights)
    return jax.jit(jax.value_and_grad(total, argnums=tuple(range(len(args)))))(*args)


@pytest.mark.parametrize("rows, width", [(37, 96), (16, 768), (5, 130)])
def test_layer_norm_matches_flax_forward_and_gradients(rows, width):
    """Row counts that do not fill the last block and widths that are not a power of two
    (the kernel masks both), statistics in float32, gradients for input, scale and bias."""
    rng = np.random.default_rng(rows)
    x = jnp.asarray(rng.normal(1.0, 3.0, (rows, width)), jnp.float32)
    scale = jnp.asarray(rng.normal(1.0, 0.2, width), jnp.float32)
    bias = jnp.asarray(rng.normal(0.0, 0.2, width), jnp.float32)
    flax_ln = lambda x, s, b: nn.LayerNorm(epsilon=1e-5).apply({"params": {"scale": s, "bias": b}}, x)
    ours = _value_and_grads(lambda x, s, b: layer_norm.layer_norm(x, s, b, 1e-5), x, scale, bias)
    ref = _value_and_grads(flax_ln, x, scale, bias)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("rows, width, copies", [(37, 96, 1), (130, 768, 1), (37, 96, 2)])
def test_add_layer_norm_matches_the_add_then_flax(rows, width, copies):
    """The residual add fused into the layer norm: its outputs (the stream and its
    normalisation, ``copies`` times) and the gradients of all five inputs, against
    ``x + branch + bias`` then Flax's LayerNorm, with arbitrary cotangents on every
    output (the copies' summed in the kernel)."""
    rng = np.random.default_rng(rows)
    x, branch = (jnp.asarray(rng.normal(0.5, 2.0, (rows, width)), jnp.float32) for _ in "xb")
    branch_bias, scale, bias = (jnp.asarray(rng.normal(0.5, 0.3, width), jnp.float32)
                                for _ in "bsc")

    def plain(x, branch, branch_bias, s, b):
        stream = x + branch + branch_bias
        y = nn.LayerNorm(epsilon=1e-5).apply({"params": {"scale": s, "bias": b}}, stream)
        return stream, *[y] * copies

    fused = lambda *args: layer_norm.add_layer_norm(*args, 1e-5, copies)
    weights = [jax.random.normal(jax.random.PRNGKey(k), (rows, width)) for k in range(copies + 1)]
    total = lambda fn: lambda *a: sum(jnp.sum(out * w) for out, w in zip(fn(*a), weights))
    args = (x, branch, branch_bias, scale, bias)
    assert len(fused(*args)) == copies + 1
    ours = jax.jit(jax.value_and_grad(total(fused), argnums=tuple(range(5))))(*args)
    ref = jax.jit(jax.value_and_grad(total(plain), argnums=tuple(range(5))))(*args)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=5e-5)


def test_layer_norm_keeps_bfloat16_inputs_in_their_dtype():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 64)), jnp.bfloat16)
    y, grad = jax.value_and_grad(lambda x: jnp.sum(layer_norm.layer_norm(
        x, jnp.ones(64), jnp.zeros(64), 1e-5).astype(jnp.float32) ** 2))(x)
    assert grad.dtype == jnp.bfloat16
    ref = nn.LayerNorm(dtype=jnp.bfloat16).apply({"params": {"scale": jnp.ones(64),
                                                             "bias": jnp.zeros(64)}}, x)
    np.testing.assert_allclose(layer_norm.layer_norm(x, jnp.ones(64), jnp.zeros(64), 1e-5)
                               .astype(jnp.float32), ref.astype(jnp.float32), atol=2e-2)


@pytest.mark.parametrize("rows, width", [(70, 700), (64, 1024)])
def test_bias_gelu_matches_autodiff_of_gelu(rows, width):
    """The fused backward (GELU derivative and the bias gradient's column sums over strips
    of rows) against autodiff of ``gelu(h + bias)``, with partial strips and columns."""
    rng = np.random.default_rng(width)
    h = jnp.asarray(rng.normal(0.0, 2.0, (rows, width)), jnp.float32)
    bias = jnp.asarray(rng.normal(0.0, 0.5, width), jnp.float32)
    plain = lambda h, b: jax.nn.gelu(h + b, approximate=True)
    ours = _value_and_grads(bias_gelu.bias_gelu, h, bias)
    ref = _value_and_grads(plain, h, bias)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5)


def test_head_loss_matches_xla_loss_and_gradients():
    """The fused head and loss against ``hidden @ embedding.T`` then XLA's loss: a padded
    vocabulary (the last columns never scored), rows weighted by arbitrary cotangents and
    masked rows (weight 0) that must pass no gradient."""
    rng = np.random.default_rng(0)
    rows, C, vocab, padded = 13, 32, 3000, 3072
    hidden = jnp.asarray(rng.normal(size=(rows, C)), jnp.float32)
    embedding = jnp.asarray(rng.normal(size=(padded, C)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, vocab, rows), jnp.int32)
    fused = lambda h, e: cross_entropy.head_nll(h, e, targets, vocab)
    plain = lambda h, e: token_nll(h @ e.T, targets, vocab)
    np.testing.assert_allclose(jax.jit(fused)(hidden, embedding),
                               jax.jit(plain)(hidden, embedding), rtol=1e-5)
    weights = jnp.asarray(rng.normal(size=rows), jnp.float32).at[3].set(0.0)
    grads = lambda f: jax.jit(jax.grad(lambda h, e: jnp.sum(f(h, e) * weights), (0, 1)))(
        hidden, embedding)
    ours, ref = grads(fused), grads(plain)
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    assert not np.any(ours[0][3]), "a masked row passed a gradient"
    assert not np.any(ours[1][vocab:]), "a padded vocabulary row got a gradient"


def test_loss_kernel_keeps_its_running_sums_exact_over_a_wide_range():
    """Logits spread over hundreds of units, rising and falling across the chunks the
    kernel reads: its per-lane maxima and rescaled sums must match one log-sum-exp."""
    rng = np.random.default_rng(5)
    columns = np.arange(5000)
    logits = np.stack([rng.uniform(-300, 300, 5000), columns * 0.1, -columns * 0.1,
                       np.where(columns == 4321, 80.0, -50.0)]).astype(np.float32)
    targets = jnp.asarray([7, 4989, 0, 4321])
    loss, grad = cross_entropy.nll(jnp.asarray(logits), targets, 4990, with_grad=True)
    # Logits near 500 leave float32 about 3e-5 of absolute precision in the difference.
    np.testing.assert_allclose(loss, token_nll(jnp.asarray(logits), targets, 4990), atol=1e-4)
    ref = jax.grad(lambda x: jnp.sum(token_nll(x, targets, 4990)))(jnp.asarray(logits))
    np.testing.assert_allclose(grad, ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("vocab, width", [(4096, 4096), (3000, 6200), (100, 128)])
def test_loss_kernel_reads_whole_and_masked_chunks(vocab, width):
    """Chunks wholly inside the vocabulary are read without a mask, the rest through one:
    a vocabulary that fills its chunks exactly, one followed by chunks of padding only,
    and one smaller than a chunk, each against XLA's loss and its gradient."""
    rng = np.random.default_rng(width)
    logits = jnp.asarray(rng.normal(0, 3, (3, width)), jnp.float32)
    targets = jnp.asarray([0, vocab - 1, vocab // 2])
    loss, grad = cross_entropy.nll(logits, targets, vocab, with_grad=True)
    np.testing.assert_allclose(loss, token_nll(logits, targets, vocab), rtol=1e-5)
    ref = jax.grad(lambda x: jnp.sum(token_nll(x, targets, vocab)))(logits)
    np.testing.assert_allclose(grad, ref, rtol=1e-4, atol=1e-7)


def test_loss_kernel_ignores_huge_logits_in_padded_columns():
    logits = jnp.zeros((2, 256)).at[:, 200:].set(1e4)
    loss, grad = cross_entropy.nll(logits, jnp.asarray([0, 199]), 200, with_grad=True)
    np.testing.assert_allclose(loss, np.log(200.0), rtol=1e-6)
    assert not np.any(grad[:, 200:])


def test_model_with_kernels_trains_like_the_xla_model(small_config):
    """A whole train step with the fused kernels equals XLA's: the same parameters (the
    fused layer norm keeps nn.LayerNorm's names) give the same loss and updates."""
    configs = [dataclasses.replace(small_config, kernels=k, bias=b)
               for b in (True, False) for k in ("xla", "pallas")]
    tx = build_optimizer(OptimConfig(warmup_steps=1), 10)
    ids = np.random.default_rng(1).integers(0, 100, (1, 3, 17)).astype(np.int32)
    mask = np.ones((1, 3, 16), np.float32)
    mask[0, 2, 9:] = 0
    batch = {"input_ids": ids[..., :-1], "targets": ids[..., 1:], "loss_mask": mask}
    results = []
    for cfg in configs:
        model = GPT(cfg)
        state = create_train_state(GPT(dataclasses.replace(cfg, kernels="xla")).init_params(
            jax.random.PRNGKey(0)), tx, 0)
        results.append(jax.jit(make_train_step(model, tx))(state, batch))
    for (xla_state, xla_metrics), (state, metrics) in (results[0:2], results[2:4]):
        np.testing.assert_allclose(metrics["loss"], xla_metrics["loss"], rtol=1e-5)
        np.testing.assert_allclose(metrics["grad_norm"], xla_metrics["grad_norm"], rtol=1e-4)
        for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(xla_state.params)):
            np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_fused_residual_stream_matches_xla_in_forward_and_decode(small_config, scan_layers):
    """With the kernels the blocks hand on a stream whose adds run in the layer-norm
    kernels: the same initial parameters, and the same logits over a whole sequence and
    through the KV cache (prefill, then one token), under a loop and under scan."""
    cfg = dataclasses.replace(small_config, kernels="pallas", scan_layers=scan_layers)
    xla = GPT(dataclasses.replace(cfg, kernels="xla"))
    params = xla.init_params(jax.random.PRNGKey(0))
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(GPT(cfg).init_params(
            jax.random.PRNGKey(0)))):
        np.testing.assert_array_equal(a, b)
    params = jax.tree.map(lambda a: a + 0.02 * jax.random.normal(jax.random.PRNGKey(3),
                                                                 a.shape), params)
    ids = jax.random.randint(jax.random.PRNGKey(1), (2, 7), 0, cfg.vocab_size)
    outputs = []
    for model in (xla, GPT(cfg)):
        prefill, cache = model.apply({"params": params}, ids[:, :6],
                                     KVCache.empty(model.config, 2), method=GPT.decode)
        step, _ = model.apply({"params": params}, ids[:, 6:], cache, method=GPT.decode)
        outputs.append((model.apply({"params": params}, ids), prefill, step))
    for a, b in zip(*outputs):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
