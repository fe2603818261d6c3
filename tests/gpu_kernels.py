"""The fused kernels on a GPU: ``python tests/gpu_kernels.py`` on a CUDA machine.

Not collected by pytest (CI has no GPU); ``tests/test_kernels.py`` runs the same kernels
through Pallas's interpreter on the CPU. Here they compile through Triton at GPT-2 124M's
shapes in bfloat16 and are compared with XLA's ops computed in float32 from the same
bfloat16 inputs, and XLA's own bfloat16 path is measured the same way, so each kernel's
error reads against the error of the path it replaces. Then a short training run of both
paths from the same start: their losses step by step. Prints one line per check and exits
non-zero if a kernel's error exceeds twice XLA's plus one bfloat16 rounding.
"""

from __future__ import annotations

import dataclasses
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jaxgpt2.config import PRESETS, GPTConfig, OptimConfig
from jaxgpt2.kernels import bias_gelu, cross_entropy, layer_norm
from jaxgpt2.loss import token_nll
from jaxgpt2.model import GPT
from jaxgpt2.optim import build_optimizer
from jaxgpt2.step import create_train_state, make_train_step


# One rounding of a bfloat16 output, relative. XLA keeps excess precision where a
# bfloat16 result is only cast back to float32 (so its "bfloat16" path can show no error
# at all); a kernel's stored output is rounded, as the training step's always is.
BFLOAT16_ROUNDING = 2.0 ** -8


def relative_error(a, b) -> float:
    a, b = (np.asarray(jnp.asarray(t, jnp.float32), np.float64) for t in (a, b))
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def outputs_and_grads(fn, args, weights) -> list:
    """``fn``'s output, then the gradients of its sum weighted by ``weights``. The output
    is compared whole: a weighted sum's relative error swells when the sum nears zero."""
    total = lambda *a: jnp.sum(fn(*a).astype(jnp.float32) * weights)
    grads = jax.jit(jax.grad(total, argnums=tuple(range(len(args)))))(*args)
    return [jax.jit(fn)(*args), *grads]


def check(name: str, fused, xla, args, exact=None) -> bool:
    """Errors of the kernel and of XLA's bfloat16 path (``xla`` on the same inputs)
    against XLA in float32 (``exact``, by default ``xla``, on the inputs widened)."""
    exact = exact or xla
    weights = jax.random.normal(jax.random.PRNGKey(1), jax.eval_shape(exact, *args).shape)
    wide = [a.astype(jnp.float32) if a.dtype == jnp.bfloat16 else a for a in args]
    ref = outputs_and_grads(exact, wide, weights)
    errors = {}
    for label, fn in (("kernel", fused), ("XLA bf16", xla)):
        got = outputs_and_grads(fn, args, weights)
        errors[label] = [relative_error(g, r) for g, r in zip(got, ref)]
        print(f"{name:12s} {label:9s} value/grad relative errors: "
              + " ".join(f"{e:.2e}" for e in errors[label]))
    return all(k <= 2 * x + BFLOAT16_ROUNDING
               for k, x in zip(errors["kernel"], errors["XLA bf16"]))


def check_layer_norm(rows: int, width: int) -> bool:
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(0.5, 2.0, (rows, width)), jnp.bfloat16)
    scale = jnp.asarray(rng.normal(1.0, 0.2, width), jnp.float32)
    bias = jnp.asarray(rng.normal(0.0, 0.2, width), jnp.float32)
    flax_ln = lambda dtype: lambda x, s, b: nn.LayerNorm(dtype=dtype).apply(
        {"params": {"scale": s, "bias": b}}, x)
    return check("layer norm", lambda x, s, b: layer_norm.layer_norm(x, s, b, 1e-5),
                 flax_ln(jnp.bfloat16), (x, scale, bias), flax_ln(jnp.float32))


def check_add_layer_norm(rows: int, width: int) -> bool:
    """With two copies of the normalisation, as the model's ``ln_1`` makes: the kernel
    sums their gradients."""
    rng = np.random.default_rng(3)
    x, branch = (jnp.asarray(rng.normal(0.5, 2.0, (rows, width)), jnp.bfloat16) for _ in "xb")
    branch_bias = jnp.asarray(rng.normal(0.0, 0.3, width), jnp.bfloat16)
    scale = jnp.asarray(rng.normal(1.0, 0.2, width), jnp.float32)
    bias = jnp.asarray(rng.normal(0.0, 0.2, width), jnp.float32)

    def plain(dtype):
        def add_then_norm(x, branch, branch_bias, s, b):
            stream = x + (branch + branch_bias)  # the XLA path's order: Dense, then the add
            y = nn.LayerNorm(dtype=dtype).apply({"params": {"scale": s, "bias": b}}, stream)
            return jnp.concatenate([stream.astype(jnp.float32), *[y.astype(jnp.float32)] * 2],
                                   axis=1)
        return add_then_norm

    fused = lambda *args: jnp.concatenate(
        [t.astype(jnp.float32) for t in layer_norm.add_layer_norm(*args, 1e-5, 2)], axis=1)
    return check("add + LN", fused, plain(jnp.bfloat16), (x, branch, branch_bias, scale, bias),
                 plain(jnp.float32))


def check_bias_gelu(rows: int, width: int) -> bool:
    rng = np.random.default_rng(4)
    h = jnp.asarray(rng.normal(0, 1.5, (rows, width)), jnp.bfloat16)
    bias = jnp.asarray(rng.normal(0, 0.3, width), jnp.bfloat16)
    plain = lambda h, b: jax.nn.gelu(h + b, approximate=True)
    return check("bias + GELU", bias_gelu.bias_gelu, plain, (h, bias))


def check_head(rows: int, width: int, vocab: int, padded: int) -> bool:
    rng = np.random.default_rng(1)
    hidden = jnp.asarray(rng.normal(0, 1.0, (rows, width)), jnp.bfloat16)
    embedding = jnp.asarray(rng.normal(0, 0.05, (padded, width)), jnp.bfloat16)
    targets = jnp.asarray(rng.integers(0, vocab, rows), jnp.int32)
    fused = lambda h, e: cross_entropy.head_nll(h, e, targets, vocab)
    plain = lambda h, e: token_nll(jnp.dot(h, e.T), targets, vocab)
    return check("head + loss", fused, plain, (hidden, embedding))


def check_rounding() -> bool:
    """Whether a kernel's float32 -> bfloat16 cast rounds as XLA's does (to nearest even):
    a cast toward zero would bias every stored activation."""
    def kernel(x_ref, y_ref):
        i = pl.program_id(0) * 1024 + jnp.arange(1024)
        plgpu.store(y_ref.at[i], plgpu.load(x_ref.at[i]).astype(jnp.bfloat16))

    x = jnp.asarray(np.random.default_rng(3).normal(size=1 << 20), jnp.float32)
    ours = pl.pallas_call(kernel, grid=(1024,), out_shape=jax.ShapeDtypeStruct(x.shape, jnp.bfloat16))(x)
    ours, xla = np.asarray(ours, np.float32), np.asarray(x.astype(jnp.bfloat16), np.float32)
    differ = ours != xla
    toward_zero = np.mean(np.abs(ours[differ]) < np.abs(xla[differ])) if differ.any() else 0.0
    print(f"float32 -> bfloat16 in a kernel: {differ.mean():.4f} of values differ from XLA's; "
          f"of those, {toward_zero:.2f} toward zero")
    return not differ.any()


def compare_training(steps: int = 8) -> bool:
    """GPT-2 124M from one start, both paths, the same batches: per-step losses."""
    gpt = GPTConfig(**PRESETS["gpt2"], vocab_size=50257, block_size=1024, dtype="bfloat16",
                    scan_layers=False)
    tx = build_optimizer(OptimConfig(warmup_steps=2), 100)
    rng = np.random.default_rng(2)
    batches = [rng.integers(0, 50257, (1, 8, 1025)).astype(np.int32) for _ in range(steps)]
    losses = {}
    for kernels in ("xla", "pallas"):
        model = GPT(dataclasses.replace(gpt, kernels=kernels))
        state = create_train_state(model.init_params(jax.random.PRNGKey(0)), tx, 0)
        step = jax.jit(make_train_step(model, tx))
        losses[kernels] = []
        for ids in batches:
            state, metrics = step(state, {"input_ids": ids[..., :-1], "targets": ids[..., 1:],
                                          "loss_mask": np.ones((1, 8, 1024), np.float32)})
            losses[kernels].append(float(metrics["loss"]))
    gaps = np.abs(np.subtract(losses["pallas"], losses["xla"]))
    print("training losses, xla:   ", " ".join(f"{v:.4f}" for v in losses["xla"]))
    print("training losses, pallas:", " ".join(f"{v:.4f}" for v in losses["pallas"]))
    print(f"largest per-step gap: {gaps.max():.4f}")
    return bool(gaps.max() < 0.02)


def main() -> int:
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}")
    results = [check_rounding(), check_layer_norm(32 * 1024, 768), check_layer_norm(4099, 1600),
               check_add_layer_norm(32 * 1024, 768), check_bias_gelu(32 * 1024, 3072),
               check_head(8192, 768, 50257, 50304), compare_training()]
    print("all within bounds" if all(results) else f"FAILED: {results}")
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
