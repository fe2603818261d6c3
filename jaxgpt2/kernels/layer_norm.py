"""Layer norm forward and backward as one kernel each (statistics in float32).

XLA computes a layer norm in several passes (mean, variance, normalise; in the backward
pass the row sums, the input gradient and two column reductions for the scale and bias
gradients). Here the forward reads each row once and writes the output and the row's
mean and inverse deviation; the backward reads each row of the input and its output
gradient once, writes the input gradient, and keeps the scale and bias gradients' column
sums in registers over a strip of rows, leaving one partial sum per strip (a few hundred
rows of them, summed afterwards). ``add_layer_norm`` also does the residual add before
the layer norm, forward and backward, in the same kernels.
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


def _forward_kernel(x_ref, *refs, eps: float, add: bool):
    """With ``add``, the normalised row is ``x + branch + branch_bias``, which is also
    written out (rounded once) as the residual stream."""
    if add:
        branch_ref, branch_bias_ref, scale_ref, bias_ref, s_ref, y_ref, mean_ref, rstd_ref = refs
    else:
        scale_ref, bias_ref, y_ref, mean_ref, rstd_ref = refs
    n, width = x_ref.shape
    r = pl.program_id(0) * FORWARD_ROWS + jnp.arange(FORWARD_ROWS)
    c = jnp.arange(lanes(width))
    col_ok = c < width
    at, ok = tile(r, c, n, width)
    x = plgpu.load(x_ref.at[at], mask=ok, other=0.0).astype(jnp.float32)
    if add:
        branch = plgpu.load(branch_ref.at[at], mask=ok, other=0.0).astype(jnp.float32)
        branch_bias = plgpu.load(branch_bias_ref.at[c], mask=col_ok, other=0.0)
        stream = (x + branch + branch_bias.astype(jnp.float32)[None, :]).astype(s_ref.dtype)
        plgpu.store(s_ref.at[at], stream, mask=ok)
        x = stream.astype(jnp.float32)  # normalise what the backward pass will read
    mean = jnp.sum(x, axis=1) / width
    centred = jnp.where(ok, x - mean[:, None], 0.0)
    rstd = jax.lax.rsqrt(jnp.sum(centred * centred, axis=1) / width + eps)
    scale = plgpu.load(scale_ref.at[c], mask=col_ok, other=0.0)
    bias = plgpu.load(bias_ref.at[c], mask=col_ok, other=0.0)
    y = centred * rstd[:, None] * scale[None, :] + bias[None, :]
    plgpu.store(y_ref.at[at], y.astype(y_ref.dtype), mask=ok)
    plgpu.store(mean_ref.at[r], mean, mask=r < n)
    plgpu.store(rstd_ref.at[r], rstd, mask=r < n)


def _backward_kernel(x_ref, *refs, add: bool, copies: int):
    """With ``add``, the residual stream's own gradient ``ds`` joins the input gradient,
    whose column sums are the branch bias's gradient. The output's ``copies`` cotangents
    are summed as they are read. Each loop step loads the next tile before it reduces the
    current one: a program's warps wait at two row reductions a tile, with too few
    programs an SM to hide the loads otherwise."""
    dy_refs, (mean_ref, rstd_ref, scale_ref, *refs) = refs[:copies], refs[copies:]
    if add:
        ds_ref, dx_ref, dscale_ref, dbias_ref, dbranch_bias_ref = refs
    else:
        dx_ref, dscale_ref, dbias_ref = refs
    n, width = x_ref.shape
    strip, tiles = pl.program_id(0), STRIP_ROWS // TILE_ROWS
    c = jnp.arange(lanes(width))
    col_ok = c < width
    scale = plgpu.load(scale_ref.at[c], mask=col_ok, other=0.0)

    def rows_of(i):
        """Tile ``i``'s row indices, its index and mask (all off past the strip's end)."""
        r = strip * STRIP_ROWS + i * TILE_ROWS + jnp.arange(TILE_ROWS)
        at, ok = tile(r, c, n, width)
        return r, at, ok & (i < tiles)

    def load(i):
        """Tile ``i``: ``(x, [dy per copy], [ds] or [], mean, rstd)``."""
        r, at, ok = rows_of(i)
        row_ok = (r < n) & (i < tiles)
        rows = lambda refs: [plgpu.load(ref.at[at], mask=ok, other=0.0) for ref in refs]
        stats = [plgpu.load(ref.at[r], mask=row_ok, other=0.0) for ref in (mean_ref, rstd_ref)]
        return (*rows([x_ref]), rows(dy_refs), rows([ds_ref] if add else []), *stats)

    def strip_tile(i, carry):
        sums, loaded = carry
        upcoming = load(i + 1)
        x, dys, ds, mean, rstd = loaded
        _, at, ok = rows_of(i)
        x, dy = x.astype(jnp.float32), sum(d.astype(jnp.float32) for d in dys)
        x_hat = jnp.where(ok, (x - mean[:, None]) * rstd[:, None], 0.0)
        scaled_dy = dy * scale[None, :]
        mean_dot = jnp.sum(x_hat * scaled_dy, axis=1) / width
        mean_dy = jnp.sum(scaled_dy, axis=1) / width
        dx = (scaled_dy - x_hat * mean_dot[:, None] - mean_dy[:, None]) * rstd[:, None]
        new = (jnp.sum(dy * x_hat, axis=0), jnp.sum(dy, axis=0))
        if add:
            dx = jnp.where(ok, dx + ds[0].astype(jnp.float32), 0.0)
            new = (*new, jnp.sum(dx, axis=0))
        plgpu.store(dx_ref.at[at], dx.astype(dx_ref.dtype), mask=ok)
        return tuple(total + part for total, part in zip(sums, new)), upcoming

    zeros = (jnp.zeros((lanes(width),), jnp.float32),) * (3 if add else 2)
    sums, _ = jax.lax.fori_loop(0, tiles, strip_tile, (zeros, load(0)))
    for out_ref, total in zip(refs[-len(sums):], sums):
        plgpu.store(out_ref.at[strip, c], total, mask=col_ok)


def _forward(x, scale, bias, eps, branch=()):
    """``(y, mean, rstd)``; with ``branch`` (``(branch, branch_bias)``) ``(s, y, mean,
    rstd)``, ``s`` the residual stream the layer norm normalised."""
    n, width = x.shape
    f32 = jnp.float32
    rows = [jax.ShapeDtypeStruct(x.shape, x.dtype)] * (2 if branch else 1)
    return pl.pallas_call(
        functools.partial(_forward_kernel, eps=eps, add=bool(branch)),
        grid=(pl.cdiv(n, FORWARD_ROWS),),
        out_shape=[*rows, jax.ShapeDtypeStruct((n,), f32), jax.ShapeDtypeStruct((n,), f32)],
        compiler_params=plgpu.CompilerParams(num_warps=FORWARD_WARPS), interpret=interpret(),
        name="add_layer_norm_forward" if branch else "layer_norm_forward",
    )(x, *branch, scale.astype(f32), bias.astype(f32))


def _backward(x, dys, mean, rstd, scale, ds=None):
    """``dx`` and the per-strip column sums: ``dscale``, ``dbias`` and, with ``ds``, the
    branch bias's gradient (``dx`` then includes ``ds``). ``dys``: the output's
    cotangents, summed."""
    n, width = x.shape
    strips = pl.cdiv(n, STRIP_ROWS)
    partial_sums = jax.ShapeDtypeStruct((strips, width), jnp.float32)
    add = ds is not None
    dx, *sums = pl.pallas_call(
        functools.partial(_backward_kernel, add=add, copies=len(dys)), grid=(strips,),
        out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype), *[partial_sums] * (3 if add else 2)],
        compiler_params=plgpu.CompilerParams(num_warps=BACKWARD_WARPS), interpret=interpret(),
        name="add_layer_norm_backward" if add else "layer_norm_backward",
    )(x, *dys, mean, rstd, scale.astype(jnp.float32), *([ds] if add else []))
    return dx, *(jnp.sum(partial, axis=0) for partial in sums)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    """Layer norm over the last axis of ``x`` (rows, width), output in ``x``'s dtype."""
    return _forward(x, scale, bias, eps)[0]


def _layer_norm_fwd(x, scale, bias, eps):
    y, mean, rstd = _forward(x, scale, bias, eps)
    return y, (x, mean, rstd, scale, bias)


def _layer_norm_bwd(eps, residuals, dy):
    x, mean, rstd, scale, bias = residuals
    dx, dscale, dbias = _backward(x, (dy,), mean, rstd, scale)
    return dx, dscale.astype(scale.dtype), dbias.astype(bias.dtype)


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def add_layer_norm(x: jax.Array, branch: jax.Array, branch_bias: jax.Array, scale: jax.Array,
                   bias: jax.Array, eps: float, copies: int = 1) -> tuple[jax.Array, ...]:
    """A residual add and the layer norm after it, for (rows, width) ``x`` and ``branch``:
    ``(s, layer_norm(s))`` with ``s = x + branch + branch_bias`` in ``x``'s dtype; with
    ``copies``, ``layer_norm(s)`` that many times.

    The backward pass adds ``s``'s own gradient to the layer norm's input gradient and
    sums the total over rows for ``branch_bias`` in the same kernel: XLA would make a
    separate pass for each. Handing consumers of the output copies of their own (the
    model's attention: one for its query and key products, one for its value product)
    lets the kernel also sum the copies' gradients as it reads them, where XLA would
    make another pass.
    """
    s, y = _forward(x, scale, bias, eps, (branch, branch_bias))[:2]
    return (s, *[y] * copies)


def _add_layer_norm_fwd(x, branch, branch_bias, scale, bias, eps, copies):
    s, y, mean, rstd = _forward(x, scale, bias, eps, (branch, branch_bias))
    return (s, *[y] * copies), (s, mean, rstd, scale, bias, branch_bias)


def _add_layer_norm_bwd(eps, copies, residuals, cotangents):
    s, mean, rstd, scale, bias, branch_bias = residuals
    ds, *dys = cotangents
    d_stream, dscale, dbias, d_branch_bias = _backward(s, dys, mean, rstd, scale, ds)
    return (d_stream, d_stream, d_branch_bias.astype(branch_bias.dtype),
            dscale.astype(scale.dtype), dbias.astype(bias.dtype))


add_layer_norm.defvjp(_add_layer_norm_fwd, _add_layer_norm_bwd)
