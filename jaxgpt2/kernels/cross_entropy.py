"""Cross-entropy over the vocabulary in one kernel: per-row loss and, for training, the
logits' gradient, written in the same launch.

XLA's loss reads the logits three times (the row maxima, the sum of exponentials, then
``softmax - onehot`` in the backward pass) and writes their gradient. This kernel keeps
a running maximum and sum per lane (rescaled when the maximum grows) while it reads a
row once, then reads the row again to write ``softmax - onehot``; only the chunk holding
the end of the vocabulary is read through a mask. ``head_nll``'s backward
pass applies each position's cotangent to the two much smaller matmul results, so the
gradient needs no further pass over the logits.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jaxgpt2.kernels import interpret

# Columns read at a time, and warps: 32 warps leave room for two programs an SM, so a
# row's second read may still find it in L2 (H200: 2.23 against 2.70 ms at 2048 and 4).
CHUNK = 4096
WARPS = 32
LOG2_E = 1.4426950408889634  # exponentials as exp2, the GPU's native one
_FLOOR = -1e30  # a finite "minus infinity": lanes that saw no real column stay finite


def _kernel(logits_ref, targets_ref, nll_ref, *grad_ref, vocab_size: int):
    row = pl.program_id(0)
    width = logits_ref.shape[1]
    whole = vocab_size // CHUNK  # chunks of real columns only: read without a mask
    chunks = pl.cdiv(width, CHUNK)
    target = plgpu.load(targets_ref.at[pl.ds(row, 1)])

    def read(i, masked: bool):
        """Chunk ``i`` of the row in base-2 units (logit * log2 e); with ``masked``,
        excluded columns at the floor."""
        cols = i * CHUNK + jnp.arange(CHUNK)
        if not masked:
            return cols, plgpu.load(logits_ref.at[row, cols]).astype(jnp.float32) * LOG2_E
        real = cols < vocab_size
        x = plgpu.load(logits_ref.at[row, cols], mask=real, other=0.0).astype(jnp.float32)
        return cols, jnp.where(real, x * LOG2_E, _FLOOR)

    def accumulate(masked: bool):
        def step(i, carry):
            """Each lane's running maximum and sum of exp2(x - maximum): one exponential
            per column, of minus the distance to the maximum, no reduction across lanes."""
            lane_max, lane_sum = carry
            _, x = read(i, masked)
            e = jnp.exp2(-jnp.abs(x - lane_max))
            lane_sum = jnp.where(x > lane_max, lane_sum * e + 1.0, lane_sum + e)
            return jnp.maximum(lane_max, x), lane_sum
        return step

    start = (jnp.full((CHUNK,), _FLOOR, jnp.float32), jnp.zeros((CHUNK,), jnp.float32))
    carry = jax.lax.fori_loop(0, whole, accumulate(False), start)
    lane_max, lane_sum = jax.lax.fori_loop(whole, chunks, accumulate(True), carry)
    row_max = jnp.max(lane_max)  # a real column's: column 0 always is one
    log2_z = row_max + jnp.log2(jnp.sum(lane_sum * jnp.exp2(lane_max - row_max)))
    target_logit = plgpu.load(logits_ref.at[row, pl.ds(target[0], 1)]).astype(jnp.float32)
    plgpu.store(nll_ref.at[pl.ds(row, 1)], log2_z / LOG2_E - target_logit)
    if not grad_ref:
        return

    def write(masked: bool):
        def step(i):
            cols, x = read(i, masked)
            p = jnp.exp2(x - log2_z)
            if masked:
                p = jnp.where(cols < vocab_size, p, 0.0)
            grad = (p - (cols == target).astype(jnp.float32)).astype(grad_ref[0].dtype)
            plgpu.store(grad_ref[0].at[row, cols], grad, mask=(cols < width) if masked else None)
        return step

    pl.loop(0, whole)(write(False))
    pl.loop(whole, chunks)(write(True))


def nll(logits: jax.Array, targets: jax.Array, vocab_size: int,
        with_grad: bool) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Per-row negative log-likelihood (float32) of ``targets`` under (rows, padded
    vocabulary) ``logits``, the columns from ``vocab_size`` on excluded; with ``with_grad``
    also ``softmax - onehot`` in the logits' dtype (zero in the excluded columns)."""
    rows = logits.shape[0]
    out_shape = [jax.ShapeDtypeStruct((rows,), jnp.float32)]
    if with_grad:
        out_shape.append(jax.ShapeDtypeStruct(logits.shape, logits.dtype))
    result = pl.pallas_call(
        functools.partial(_kernel, vocab_size=vocab_size), grid=(rows,), out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=WARPS), interpret=interpret(),
        name="cross_entropy")(logits, targets.astype(jnp.int32))
    return tuple(result) if with_grad else result[0]


def _project(hidden: jax.Array, embedding: jax.Array) -> jax.Array:
    return jax.lax.dot_general(hidden, embedding, (((1,), (1,)), ((), ())))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def head_nll(hidden: jax.Array, embedding: jax.Array, targets: jax.Array,
             vocab_size: int) -> jax.Array:
    """Per-row loss of the tied output head: ``nll(hidden @ embedding.T, targets)`` for
    (rows, C) ``hidden`` and (padded vocabulary, C) ``embedding`` in the compute dtype.

    Its backward pass scales ``grad @ embedding`` and ``hidden`` by each row's cotangent
    instead of the (rows, vocabulary) gradient, so no pass over the logits is left for it.
    """
    return nll(_project(hidden, embedding), targets, vocab_size, with_grad=False)


def _head_nll_fwd(hidden, embedding, targets, vocab_size):
    loss, grad = nll(_project(hidden, embedding), targets, vocab_size, with_grad=True)
    return loss, (hidden, embedding, grad)


def _head_nll_bwd(vocab_size, residuals, g):
    hidden, embedding, grad = residuals
    d_hidden = jnp.dot(grad, embedding, preferred_element_type=jnp.float32) * g[:, None]
    weighted = (hidden.astype(jnp.float32) * g[:, None]).astype(hidden.dtype)
    d_embedding = jax.lax.dot_general(grad, weighted, (((0,), (0,)), ((), ())))
    return d_hidden.astype(hidden.dtype), d_embedding.astype(embedding.dtype), None


head_nll.defvjp(_head_nll_fwd, _head_nll_bwd)
