"""Rematerialization policies selectable by name (``model.remat``).

Each block is wrapped in ``jax.checkpoint`` with one of these policies: ``none`` keeps
every activation (fastest, most memory), ``full`` recomputes the whole block in the
backward pass, and the others save a chosen subset (the matmul outputs, typically).
The names are declared once, as ``config.RematPolicy``.
"""

from __future__ import annotations

import typing
from typing import Callable

import jax

from jaxgpt2.config import RematPolicy

REMAT_POLICIES: dict[str, Callable | None] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_attention_out": jax.checkpoint_policies.save_only_these_names("attention_out"),
}
assert set(REMAT_POLICIES) == set(typing.get_args(RematPolicy)), "config.RematPolicy drifted"


def remat_block(fn: Callable, policy_name: str) -> Callable:
    """Wrap a block function in ``jax.checkpoint`` unless the policy is ``none``."""
    if policy_name == "none":
        return fn
    return jax.checkpoint(fn, policy=REMAT_POLICIES[policy_name], prevent_cse=True)
