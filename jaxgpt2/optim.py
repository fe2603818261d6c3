"""The optimizer: AdamW with a decay mask, global-norm clipping and a non-finite guard.

``apply_if_finite`` wraps the whole chain (clip included), so a step whose gradient holds
a NaN or inf leaves parameters, Adam moments and the schedule's count untouched; only
its counters move. The learning rate therefore follows applied updates, not attempts.

optax's own give-up (``max_consecutive_errors``) applies the non-finite update once the
streak passes the limit, which would poison the weights; so optax is told never to give
up and the training loop stops at ``optim.max_consecutive_nonfinite`` instead, saving
its state (whose weights are still the last finite update's).
"""

from __future__ import annotations

import jax
import numpy as np
import optax

from jaxgpt2.config import OptimConfig

DECAYED_LEAVES = ("kernel", "embedding")


def learning_rate_schedule(config: OptimConfig, max_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to ``lr``, then cosine down to ``min_lr`` at ``decay_steps``
    (``decay_steps`` counts the warmup, as nanoGPT's ``lr_decay_iters`` does)."""
    decay_steps = config.decay_steps or max_steps
    if config.schedule == "constant":
        warmup = optax.linear_schedule(0.0, config.lr, max(config.warmup_steps, 1))
        return optax.join_schedules([warmup, optax.constant_schedule(config.lr)],
                                    [config.warmup_steps])
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=config.lr, warmup_steps=config.warmup_steps,
        decay_steps=max(decay_steps, config.warmup_steps + 1), end_value=config.min_lr)


def weight_decay_mask(params) -> dict:
    """True for weight matrices and embeddings (``kernel``, ``embedding``), False for
    biases and LayerNorm parameters. Decided by name, not rank: stacked layers make
    biases 2-D."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) in DECAYED_LEAVES, params)


def applied_updates(opt_state: optax.ApplyIfFiniteState, attempted: jax.Array) -> jax.Array:
    """How many updates the optimizer has applied: the count its learning-rate schedule
    reads, which skipped steps (non-finite, or float16 overflows) do not advance. An
    optimizer without a schedule count (tests' plain SGD) is estimated from
    ``attempted`` steps less the non-finite ones."""
    found = optax.tree_utils.tree_get_all_with_path(opt_state, "count")
    scheduled = [v for path, v in found if getattr(path[-1], "tuple_name", "") == "ScaleByScheduleState"]
    if scheduled or found:
        return (scheduled or [v for _, v in found])[0]
    return attempted - opt_state.total_notfinite


def make_optimizer(config: OptimConfig, max_steps: int) -> optax.GradientTransformation:
    schedule = learning_rate_schedule(config, max_steps)
    chain = optax.chain(
        optax.clip_by_global_norm(config.grad_clip),
        optax.adamw(schedule, b1=config.b1, b2=config.b2, eps=config.eps,
                    weight_decay=config.weight_decay, mask=weight_decay_mask),
    )
    return optax.apply_if_finite(chain, max_consecutive_errors=int(np.iinfo(np.int32).max))
