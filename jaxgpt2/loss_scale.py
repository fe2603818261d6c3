"""Dynamic loss scaling, which float16 training needs and bfloat16 does not.

float16 keeps five exponent bits: activation gradients smaller than about 6e-8 flush to
zero and larger than 65504 overflow. Multiplying the loss by a scale ``S`` before the
backward pass lifts the small gradients into range; the float32 parameter gradients are
divided by ``S`` afterwards. ``S`` adapts as PyTorch's ``GradScaler`` does: a step whose
gradient overflows is skipped and halves ``S``, and ``interval`` finite steps in a row
double it.

An overflow is a non-finite gradient under a finite loss while ``S`` is above 1, which a
smaller scale can cure. Such steps are skipped here, outside ``optax.apply_if_finite``,
so they do not count towards ``optim.max_consecutive_nonfinite``: a run that starts with
too large a scale calibrates itself instead of stopping. A non-finite loss, or a
non-finite gradient at ``S = 1``, is a real failure and goes to ``apply_if_finite``.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp


class LossScale(flax.struct.PyTreeNode):
    """The scale and its bookkeeping, checkpointed with the train state."""

    scale: jax.Array  # float32
    good_steps: jax.Array  # int32: finite steps since the scale last changed

    @classmethod
    def create(cls, initial_scale: float) -> LossScale:
        return cls(scale=jnp.asarray(initial_scale, jnp.float32),
                   good_steps=jnp.zeros((), jnp.int32))

    def is_overflow(self, loss: jax.Array, grads_finite: jax.Array) -> jax.Array:
        """True when a smaller scale can cure this step's non-finite gradient."""
        return ~grads_finite & jnp.isfinite(loss) & (self.scale > 1.0)

    def update(self, grads_finite: jax.Array, interval: int) -> LossScale:
        """Halve after a non-finite gradient (never below 1); double after ``interval``
        finite steps in a row."""
        grow = grads_finite & (self.good_steps + 1 >= interval)
        scale = jnp.where(grads_finite, jnp.where(grow, 2.0 * self.scale, self.scale),
                          jnp.maximum(0.5 * self.scale, 1.0))
        good_steps = jnp.where(grads_finite & ~grow, self.good_steps + 1, 0)
        return LossScale(scale=scale, good_steps=good_steps)


def all_finite(tree) -> jax.Array:
    return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))
