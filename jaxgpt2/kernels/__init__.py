"""Fused GPU kernels in Pallas (Triton lowering), chosen by ``model.kernels``.

Each kernel replaces a memory-bound stretch of the step that XLA leaves as several
passes over the same tensor: the layer norm and the residual add before it
(``layer_norm``), the MLP's bias and GELU with the bias gradient (``bias_gelu``) and the
loss over the vocabulary (``cross_entropy``). They run wherever JAX runs: compiled
through Triton on a GPU, and through Pallas's interpreter elsewhere, which is how the
CPU tests check them against the XLA path. Measurements are in ``docs/performance.md``.
"""

from __future__ import annotations

import jax


def tile(rows: jax.Array, cols: jax.Array, n_rows: int, width: int):
    """The ``rows`` x ``cols`` tile of an (n_rows, width) array: its index for
    ``ref.at[...]``, and its mask (rows and columns past the array's end are off)."""
    return (rows[:, None], cols[None, :]), (rows < n_rows)[:, None] & (cols < width)[None, :]


def interpret() -> bool:
    """Pallas's interpreter off a GPU: slow, but the same kernel, so CPU tests check it."""
    return jax.default_backend() != "gpu"


def lanes(width: int) -> int:
    """Triton's tensors are a power of two wide: the smallest one holding ``width``."""
    return 1 << (width - 1).bit_length()
