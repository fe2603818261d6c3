"""The optimizer: a registry of update rules inside one guarded chain, and its schedule.

Every run's optimizer is ``apply_if_finite(chain(clip_by_global_norm, <rule>))`` where
the rule comes from ``OPTIMIZERS[optim.name]`` and follows the schedule from
``SCHEDULES[optim.schedule]``. Adding an optimizer is one entry in ``OPTIMIZERS`` (and
its name in ``config.OptimizerName``): clipping, the weight-decay mask, the non-finite
guard, accumulation and loss scaling stay around it unchanged.

``apply_if_finite`` wraps the whole chain (clip included), so a step whose gradient holds
a NaN or inf leaves parameters, optimizer moments and the schedule's count untouched;
only its counters move. The learning rate therefore follows applied updates, not
attempts. optax's own give-up (``max_consecutive_errors``) would apply the non-finite
update once the streak passes the limit and poison the weights, so optax is told never
to give up; the training loop stops at ``optim.max_consecutive_nonfinite`` instead.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Any, Callable

import jax
import numpy as np
import optax

from jaxgpt2.config import OptimConfig, OptimizerName, ScheduleName

DECAYED_LEAVES = ("kernel", "embedding")


def weight_decay_mask(params) -> dict:
    """True for weight matrices and embeddings (``kernel``, ``embedding``), False for
    biases and LayerNorm parameters. Decided by name, not rank: stacked layers make
    biases 2-D."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) in DECAYED_LEAVES, params)


def _cosine(config: OptimConfig, decay_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to ``lr``, then cosine down to ``min_lr`` at ``decay_steps``
    (which counts the warmup, as nanoGPT's ``lr_decay_iters`` does)."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=config.lr, warmup_steps=config.warmup_steps,
        decay_steps=max(decay_steps, config.warmup_steps + 1), end_value=config.min_lr)


def _constant(config: OptimConfig, decay_steps: int) -> optax.Schedule:
    """Linear warmup, then ``lr`` held (fine-tuning recipes)."""
    warmup = optax.linear_schedule(0.0, config.lr, max(config.warmup_steps, 1))
    return optax.join_schedules([warmup, optax.constant_schedule(config.lr)],
                                [config.warmup_steps])


def _adamw(config: OptimConfig, schedule: optax.Schedule) -> optax.GradientTransformation:
    return optax.adamw(schedule, b1=config.b1, b2=config.b2, eps=config.eps,
                       weight_decay=config.weight_decay, mask=weight_decay_mask)


SCHEDULES: dict[str, Callable[[OptimConfig, int], optax.Schedule]] = {
    "cosine": _cosine,
    "constant": _constant,
}
OPTIMIZERS: dict[str, Callable[[OptimConfig, optax.Schedule], optax.GradientTransformation]] = {
    "adamw": _adamw,
}
assert set(SCHEDULES) == set(typing.get_args(ScheduleName)), "config.ScheduleName drifted"
assert set(OPTIMIZERS) == set(typing.get_args(OptimizerName)), "config.OptimizerName drifted"


def learning_rate_schedule(config: OptimConfig, max_steps: int) -> optax.Schedule:
    """The schedule ``optim.schedule`` names; ``decay_steps: null`` decays over the run."""
    return SCHEDULES[config.schedule](config, config.decay_steps or max_steps)


@dataclass(frozen=True)
class Optimizer:
    """A guarded optax transformation and the learning-rate schedule it follows.

    ``tx`` is always ``apply_if_finite(...)``, so the readers below (``update_applied``,
    ``nonfinite_streak``, ``learning_rate``) are the one place that knows its state.
    """

    tx: optax.GradientTransformation
    schedule: optax.Schedule

    @classmethod
    def guard(cls, inner: optax.GradientTransformation, schedule: optax.Schedule) -> Optimizer:
        """``inner`` under ``apply_if_finite``, which never gives up (see the module doc)."""
        never = int(np.iinfo(np.int32).max)
        return cls(optax.apply_if_finite(inner, max_consecutive_errors=never), schedule)

    def init(self, params: Any) -> optax.OptState:
        return self.tx.init(params)

    def update(self, grads: Any, opt_state: optax.OptState, params: Any):
        return self.tx.update(grads, opt_state, params)

    @staticmethod
    def update_applied(opt_state: optax.ApplyIfFiniteState) -> jax.Array:
        """Whether the update that produced ``opt_state`` was applied (gradient finite)."""
        return opt_state.notfinite_count == 0

    @staticmethod
    def nonfinite_streak(opt_state: optax.ApplyIfFiniteState) -> jax.Array:
        """Consecutive skipped (non-finite) updates up to ``opt_state``."""
        return opt_state.notfinite_count

    def learning_rate(self, opt_state: optax.ApplyIfFiniteState, attempted: jax.Array) -> jax.Array:
        """The rate the next update uses: the schedule at the applied-update count."""
        return self.schedule(applied_updates(opt_state, attempted))


def applied_updates(opt_state: optax.ApplyIfFiniteState, attempted: jax.Array) -> jax.Array:
    """How many updates the optimizer has applied: the count its learning-rate schedule
    reads, which skipped steps (non-finite, or float16 overflows) do not advance. A rule
    without a schedule count (tests' plain SGD) is estimated from ``attempted`` steps
    less the non-finite ones."""
    found = optax.tree_utils.tree_get_all_with_path(opt_state, "count")
    scheduled = [v for path, v in found if getattr(path[-1], "tuple_name", "") == "ScaleByScheduleState"]
    if scheduled or found:
        return (scheduled or [v for _, v in found])[0]
    return attempted - opt_state.total_notfinite


def build_optimizer(config: OptimConfig, max_steps: int) -> Optimizer:
    """``optim.name``'s rule after global-norm clipping, under the non-finite guard."""
    schedule = learning_rate_schedule(config, max_steps)
    inner = optax.chain(optax.clip_by_global_norm(config.grad_clip),
                        OPTIMIZERS[config.name](config, schedule))
    return Optimizer.guard(inner, schedule)
