"""Layer norm forward and backward as one kernel each (statistics in float32).

XLA computes a layer norm in several passes (mean, variance, normalise; in the backward
pass the row sums, the input gradient and two column reductions for the scale and bias
gradients). Here the forward reads each row once and writes the output and the row's
mean and inverse deviation; the backward reads each row of the input and its output
gradient once, writes the input gradient, and keeps the scale and bias gradients' column
sums in registers over a strip of rows, leaving one partial sum per strip (a few hundred
rows of them, summed afterwards).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jaxgpt2.kernels import interpret, lanes, tile

FORWARD_ROWS = 4  # rows per program
FORWARD_WARPS = 8
TILE_ROWS = 4  # rows per step of the backward kernel's loop
STRIP_ROWS = 64  # rows per backward program
BACKWARD_WARPS = 4


def _forward_kernel(x_ref, scale_ref, bias_ref, y_ref, mean_ref, rstd_ref, *, eps: float):
    n, width = x_ref.shape
    r = pl.program_id(0) * FORWARD_ROWS + jnp.arange(FORWARD_ROWS)
    c = jnp.arange(lanes(width))
    col_ok = c < width
    at, ok = tile(r, c, n, width)
    x = plgpu.load(x_ref.at[at], mask=ok, other=0.0).astype(jnp.float32)
    mean = jnp.sum(x, axis=1) / width
    centred = jnp.where(ok, x - mean[:, None], 0.0)
    rstd = jax.lax.rsqrt(jnp.sum(centred * centred, axis=1) / width + eps)
    scale = plgpu.load(scale_ref.at[c], mask=col_ok, other=0.0)
    bias = plgpu.load(bias_ref.at[c], mask=col_ok, other=0.0)
    y = centred * rstd[:, None] * scale[None, :] + bias[None, :]
    plgpu.store(y_ref.at[at], y.astype(y_ref.dtype), mask=ok)
    plgpu.store(mean_ref.at[r], mean, mask=r < n)
    plgpu.store(rstd_ref.at[r], rstd, mask=r < n)


def _backward_kernel(x_ref, dy_ref, mean_ref, rstd_ref, scale_ref, dx_ref, dscale_ref,
                     dbias_ref):
    n, width = x_ref.shape
    strip = pl.program_id(0)
    c = jnp.arange(lanes(width))
    col_ok = c < width
    scale = plgpu.load(scale_ref.at[c], mask=col_ok, other=0.0)

    def strip_tile(i, sums):
        r = strip * STRIP_ROWS + i * TILE_ROWS + jnp.arange(TILE_ROWS)
        row_ok = r < n
        at, ok = tile(r, c, n, width)
        x = plgpu.load(x_ref.at[at], mask=ok, other=0.0).astype(jnp.float32)
        dy = plgpu.load(dy_ref.at[at], mask=ok, other=0.0).astype(jnp.float32)
        mean = plgpu.load(mean_ref.at[r], mask=row_ok, other=0.0)
        rstd = plgpu.load(rstd_ref.at[r], mask=row_ok, other=0.0)
        x_hat = jnp.where(ok, (x - mean[:, None]) * rstd[:, None], 0.0)
        scaled_dy = dy * scale[None, :]
        mean_dot = jnp.sum(x_hat * scaled_dy, axis=1) / width
        mean_dy = jnp.sum(scaled_dy, axis=1) / width
        dx = (scaled_dy - x_hat * mean_dot[:, None] - mean_dy[:, None]) * rstd[:, None]
        plgpu.store(dx_ref.at[at], dx.astype(dx_ref.dtype), mask=ok)
        return sums[0] + jnp.sum(dy * x_hat, axis=0), sums[1] + jnp.sum(dy, axis=0)

    zeros = jnp.zeros((lanes(width),), jnp.float32)
    dscale, dbias = jax.lax.fori_loop(0, STRIP_ROWS // TILE_ROWS, strip_tile, (zeros, zeros))
    plgpu.store(dscale_ref.at[strip, c], dscale, mask=col_ok)
    plgpu.store(dbias_ref.at[strip, c], dbias, mask=col_ok)


def _forward(x, scale, bias, eps):
    n, width = x.shape
    f32 = jnp.float32
    return pl.pallas_call(
        functools.partial(_forward_kernel, eps=eps), grid=(pl.cdiv(n, FORWARD_ROWS),),
        out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct((n,), f32),
                   jax.ShapeDtypeStruct((n,), f32)],
        compiler_params=plgpu.CompilerParams(num_warps=FORWARD_WARPS), interpret=interpret(),
        name="layer_norm_forward")(x, scale.astype(f32), bias.astype(f32))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    """Layer norm over the last axis of ``x`` (rows, width), output in ``x``'s dtype."""
    return _forward(x, scale, bias, eps)[0]


def _layer_norm_fwd(x, scale, bias, eps):
    y, mean, rstd = _forward(x, scale, bias, eps)
    return y, (x, mean, rstd, scale, bias)


def _layer_norm_bwd(eps, residuals, dy):
    x, mean, rstd, scale, bias = residuals
    n, width = x.shape
    strips = pl.cdiv(n, STRIP_ROWS)
    partial_sums = jax.ShapeDtypeStruct((strips, width), jnp.float32)
    dx, dscale, dbias = pl.pallas_call(
        _backward_kernel, grid=(strips,),
        out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype), partial_sums, partial_sums],
        compiler_params=plgpu.CompilerParams(num_warps=BACKWARD_WARPS), interpret=interpret(),
        name="layer_norm_backward")(x, dy, mean, rstd, scale.astype(jnp.float32))
    return (dx, jnp.sum(dscale, axis=0).astype(scale.dtype),
            jnp.sum(dbias, axis=0).astype(bias.dtype))


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)
