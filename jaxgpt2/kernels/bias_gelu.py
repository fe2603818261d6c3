"""The MLP's bias and GELU as two kernels: the forward in float32 with one rounding,
and a fused backward pass, the GELU's gradient and the bias gradient's column sums.

XLA computes the bias gradient of ``c_fc`` as a separate column reduction over the
(rows, 4C) gradient, recomputing the GELU derivative from the saved pre-activation:
the slowest memory-bound kernel of the step. Here one kernel reads the matmul output and
the incoming gradient once, writes the pre-activation's gradient (which both backward
matmuls then read), and keeps the bias gradient's column sums in registers over a strip
of rows. The forward kernel reads the matmul output once and writes the activation.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jaxgpt2.kernels import interpret, tile

TILE_ROWS = 4
STRIP_ROWS = 64
COLUMNS = 1024
WARPS = 4
_C = math.sqrt(2.0 / math.pi)


def _tanh(u: jax.Array) -> jax.Array:
    """``tanh.approx.f32`` on a GPU: one instruction, relative error about 2^-11, below the
    bfloat16 rounding of the result; libdevice's ``tanhf`` is a branching sequence."""
    return jnp.tanh(u) if interpret() else plgpu.approx_tanh(u)


def _gelu(z: jax.Array) -> jax.Array:
    """GPT-2's "gelu_new", the tanh approximation, in float32."""
    return 0.5 * z * (1.0 + _tanh(_C * (z + 0.044715 * z * z * z)))


def _gelu_grad(z: jax.Array) -> jax.Array:
    """d gelu(z) / dz of the tanh approximation, in float32."""
    t = _tanh(_C * (z + 0.044715 * z * z * z))
    return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * _C * (1.0 + 3 * 0.044715 * z * z)


def _forward_kernel(h_ref, bias_ref, y_ref):
    rows, width = h_ref.shape
    r = pl.program_id(0) * TILE_ROWS + jnp.arange(TILE_ROWS)
    c = pl.program_id(1) * COLUMNS + jnp.arange(COLUMNS)
    at, ok = tile(r, c, rows, width)
    bias = plgpu.load(bias_ref.at[c], mask=c < width, other=0.0).astype(jnp.float32)
    z = plgpu.load(h_ref.at[at], mask=ok, other=0.0).astype(jnp.float32) + bias[None, :]
    plgpu.store(y_ref.at[at], _gelu(z).astype(y_ref.dtype), mask=ok)


def _backward_kernel(h_ref, bias_ref, dy_ref, dh_ref, dbias_ref):
    rows, width = h_ref.shape
    strip, block = pl.program_id(0), pl.program_id(1)
    c = block * COLUMNS + jnp.arange(COLUMNS)
    col_ok = c < width
    bias = plgpu.load(bias_ref.at[c], mask=col_ok, other=0.0).astype(jnp.float32)

    def strip_tile(i, column_sum):
        r = strip * STRIP_ROWS + i * TILE_ROWS + jnp.arange(TILE_ROWS)
        at, ok = tile(r, c, rows, width)
        z = plgpu.load(h_ref.at[at], mask=ok, other=0.0).astype(jnp.float32) + bias[None, :]
        dy = plgpu.load(dy_ref.at[at], mask=ok, other=0.0).astype(jnp.float32)
        dh = jnp.where(ok, dy * _gelu_grad(z), 0.0)
        plgpu.store(dh_ref.at[at], dh.astype(dh_ref.dtype), mask=ok)
        return column_sum + jnp.sum(dh, axis=0)

    zeros = jnp.zeros((COLUMNS,), jnp.float32)
    total = jax.lax.fori_loop(0, STRIP_ROWS // TILE_ROWS, strip_tile, zeros)
    plgpu.store(dbias_ref.at[strip, c], total, mask=col_ok)


def _forward(h, bias):
    rows, width = h.shape
    return pl.pallas_call(
        _forward_kernel, grid=(pl.cdiv(rows, TILE_ROWS), pl.cdiv(width, COLUMNS)),
        out_shape=jax.ShapeDtypeStruct(h.shape, h.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=WARPS), interpret=interpret(),
        name="bias_gelu_forward")(h, bias)


@jax.custom_vjp
def bias_gelu(h: jax.Array, bias: jax.Array) -> jax.Array:
    """``gelu(h + bias)`` (tanh approximation) for (rows, width) ``h``, in ``h``'s dtype."""
    return _forward(h, bias)


def _bias_gelu_fwd(h, bias):
    return _forward(h, bias), (h, bias)


def _bias_gelu_bwd(residuals, dy):
    h, bias = residuals
    rows, width = h.shape
    grid = (pl.cdiv(rows, STRIP_ROWS), pl.cdiv(width, COLUMNS))
    dh, dbias = pl.pallas_call(
        _backward_kernel, grid=grid,
        out_shape=[jax.ShapeDtypeStruct(h.shape, h.dtype),
                   jax.ShapeDtypeStruct((grid[0], width), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=WARPS), interpret=interpret(),
        name="bias_gelu_backward")(h, bias, dy)
    return dh, jnp.sum(dbias, axis=0).astype(bias.dtype)


bias_gelu.defvjp(_bias_gelu_fwd, _bias_gelu_bwd)
