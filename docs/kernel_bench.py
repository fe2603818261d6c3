"""The fused kernels alone against XLA's ops, at GPT-2 124M's training shapes (GPU).

    python docs/kernel_bench.py [--rows 32768] [--tune [layer_norm bias_gelu loss]]

Times, per call, a layer norm's forward and forward + backward on (rows, 768) bfloat16,
alone and with the residual add before it;
the MLP's bias and GELU, forward and forward + backward on (rows, 3072); the loss
kernel alone on (rows, 50304) logits; and the tied
head with its loss (forward + backward: the three matmuls and the loss) on (rows, 768)
hidden states and the (50304, 768) embedding: XLA against the kernel. ``--tune`` also
times the kernels' tile settings (rows per program and per loop step, warps, widths;
for the loss, columns per read).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxgpt2.kernels import bias_gelu, cross_entropy, layer_norm
from jaxgpt2.loss import token_nll


def timed(fn, *args, repeats: int = 30) -> float:
    """Mean ms per call after a compile and a warm-up call."""
    fn = jax.jit(fn)
    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
    began = time.perf_counter()
    for _ in range(repeats):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - began) / repeats * 1e3


def forward_and_backward(paths, args: tuple,
                         dy: jax.Array | tuple) -> list[tuple[str, float, float]]:
    """``(path, forward ms, forward + backward ms)`` for each ``(path, fn)`` on ``args``,
    the backward pulling ``dy`` back to every argument."""
    with_backward = lambda f: lambda dy, *a: jax.vjp(f, *a)[1](dy)
    return [(name, timed(f, *args), timed(with_backward(f), dy, *args)) for name, f in paths]


def layer_norm_rows(rows: int) -> list[tuple[str, float, float]]:
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(rows, 768)), jnp.bfloat16)
    dy = jnp.asarray(rng.normal(size=(rows, 768)), jnp.bfloat16)
    s, b = jnp.ones(768), jnp.zeros(768)
    flax_ln = lambda x, s, b: nn.LayerNorm(dtype=jnp.bfloat16).apply(
        {"params": {"scale": s, "bias": b}}, x)
    ours = lambda x, s, b: layer_norm.layer_norm(x, s, b, 1e-5)
    return forward_and_backward((("XLA", flax_ln), ("kernel", ours)), (x, s, b), dy)


def add_layer_norm_rows(rows: int) -> list[tuple[str, float, float]]:
    rng = np.random.default_rng(5)
    x, h, ds, dy = (jnp.asarray(rng.normal(size=(rows, 768)), jnp.bfloat16) for _ in range(4))
    hb = jnp.asarray(rng.normal(size=768), jnp.bfloat16)
    s, b = jnp.ones(768), jnp.zeros(768)

    def plain(x, h, hb, s, b):
        stream = x + (h + hb)
        return stream, nn.LayerNorm(dtype=jnp.bfloat16).apply(
            {"params": {"scale": s, "bias": b}}, stream)

    ours = lambda x, h, hb, s, b: layer_norm.add_layer_norm(x, h, hb, s, b, 1e-5)
    return forward_and_backward((("XLA", plain), ("kernel", ours)), (x, h, hb, s, b), (ds, dy))


def bias_gelu_rows(rows: int) -> list[tuple[str, float, float]]:
    rng = np.random.default_rng(2)
    h = jnp.asarray(rng.normal(size=(rows, 3072)), jnp.bfloat16)
    dy = jnp.asarray(rng.normal(size=(rows, 3072)), jnp.bfloat16)
    b = jnp.asarray(rng.normal(size=3072), jnp.bfloat16)
    plain = lambda h, b: jax.nn.gelu(h + b, approximate=True)
    return forward_and_backward((("XLA", plain), ("kernel", bias_gelu.bias_gelu)), (h, b), dy)


@functools.cache
def _logits(rows: int) -> tuple[jax.Array, jax.Array]:
    """(rows, 50304) bfloat16 logits and targets, drawn on the device once per size."""
    logits_key, targets_key = jax.random.split(jax.random.PRNGKey(4))
    logits = 2 * jax.random.normal(logits_key, (rows, 50304), jnp.bfloat16)
    return logits, jax.random.randint(targets_key, (rows,), 0, 50257)


def loss_alone(rows: int) -> float:
    """The loss kernel with its gradient on (rows, 50304) bfloat16 logits, no matmuls."""
    logits, targets = _logits(rows)
    return timed(lambda x: cross_entropy.nll(x, targets, 50257, with_grad=True), logits)


def head_rows(rows: int) -> list[tuple[str, float, float]]:
    rng = np.random.default_rng(1)
    h = jnp.asarray(rng.normal(size=(rows, 768)), jnp.bfloat16)
    e = jnp.asarray(rng.normal(0, 0.05, (50304, 768)), jnp.bfloat16)
    t = jnp.asarray(rng.integers(0, 50257, rows), jnp.int32)
    plain = lambda h, e: token_nll(jnp.dot(h, e.T), t, 50257)
    fused = lambda h, e: cross_entropy.head_nll(h, e, t, 50257)
    grads = lambda f: jax.grad(lambda h, e: jnp.sum(f(h, e)), (0, 1))
    return [(name, timed(f, h, e), timed(grads(f), h, e))
            for name, f in (("XLA", plain), ("kernel", fused))]


def tune_layer_norm(rows: int) -> None:
    for tile, strip, warps in itertools.product((2, 4, 8), (16, 32, 64, 128), (4, 8)):
        layer_norm.TILE_ROWS, layer_norm.STRIP_ROWS, layer_norm.BACKWARD_WARPS = tile, strip, warps
        (_, fwd, both), (_, add_fwd, add_both) = (
            layer_norm_rows(rows)[1], add_layer_norm_rows(rows)[1])
        print(f"layer norm backward tile {tile} strip {strip} warps {warps}: "
              f"bwd {both - fwd:.3f} ms, with the add {add_both - add_fwd:.3f} ms")


def tune_bias_gelu(rows: int) -> None:
    settings = [(4, 64, 512, 4), (8, 64, 512, 4), (8, 64, 512, 8), (8, 128, 512, 4),
                (8, 32, 512, 4), (4, 64, 1024, 4), (4, 64, 1024, 8), (16, 64, 256, 4),
                (8, 64, 256, 4), (2, 64, 1024, 4)]
    for tile, strip, columns, warps in settings:
        (bias_gelu.TILE_ROWS, bias_gelu.STRIP_ROWS, bias_gelu.COLUMNS,
         bias_gelu.WARPS) = tile, strip, columns, warps
        _, fwd, both = bias_gelu_rows(rows)[1]
        print(f"bias GELU tile {tile} strip {strip} columns {columns} warps {warps}: "
              f"fwd+bwd {both:.3f} ms")


def tune_loss(rows: int) -> None:
    # The first setting again last: a process's first timings can run slow. 32 warps leave
    # room for two programs an SM, about 260 rows (26 MB) in flight: the second read of a
    # row may then still find it in L2.
    for chunk, warps in [(2048, 4), (1024, 4), (2048, 8), (4096, 8), (8192, 16), (1024, 16),
                         (2048, 16), (4096, 16), (1024, 32), (2048, 32), (4096, 32), (8192, 32),
                         (2048, 4)]:
        cross_entropy.CHUNK, cross_entropy.WARPS = chunk, warps
        print(f"loss alone, chunk {chunk} warps {warps}: {loss_alone(rows):.3f} ms")


TUNERS = {"layer_norm": tune_layer_norm, "bias_gelu": tune_bias_gelu, "loss": tune_loss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=32 * 1024)
    parser.add_argument("--tune", nargs="*", choices=sorted(TUNERS), default=None,
                        help="time these kernels' settings (all of them with no name)")
    args = parser.parse_args()
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}, rows {args.rows}")
    print("| op | path | forward ms | forward + backward ms |\n|---|---|---|---|")
    for op, results in (("layer norm (x, 768)", layer_norm_rows(args.rows)),
                        ("residual add + layer norm (x, 768)", add_layer_norm_rows(args.rows)),
                        ("bias + GELU (x, 3072)", bias_gelu_rows(args.rows)),
                        ("head + loss", head_rows(args.rows))):
        for name, fwd, both in results:
            print(f"| {op} | {name} | {fwd:.3f} | {both:.3f} |")
    print(f"| loss alone (x, 50304), with its gradient | kernel | | {loss_alone(args.rows):.3f} |")
    for name in (TUNERS if args.tune == [] else args.tune or []):
        TUNERS[name](args.rows)


if __name__ == "__main__":
    main()
