"""The loss and the pure ``train_step``/``eval_step`` functions the trainer jits.

``train_step(state, batch) -> (state, metrics)`` is a pure function, so it can be jitted
with explicit shardings and donated buffers, and tested without the loop around it.
Gradient accumulation is a ``lax.scan`` over micro-batches inside the step: the
gradient is of the token-summed loss, divided once by the total count of real tokens,
so accumulating 4 micro-batches of B rows equals one batch of 4B rows.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import optax

from jaxgpt2.model import GPT


class TrainState(flax.struct.PyTreeNode):
    """Everything a step changes. ``step`` counts attempted steps (skipped ones too);
    ``rng`` is raw ``uint32[2]`` key data so it checkpoints as a plain array."""

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array


def create_train_state(params: Any, optimizer: optax.GradientTransformation,
                       seed: int) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=optimizer.init(params), rng=jax.random.PRNGKey(seed))


def cross_entropy_sum(padded_logits: jax.Array, targets: jax.Array, loss_mask: jax.Array,
                      vocab_size: int) -> tuple[jax.Array, jax.Array]:
    """Summed next-token cross-entropy over real targets, and their count.

    Logits may arrive in bfloat16; the log-sum-exp runs in float32 and the padded
    vocabulary columns are excluded, so they are never predicted.
    """
    logits = padded_logits.astype(jnp.float32)
    columns = jnp.arange(logits.shape[-1])
    logits = jnp.where(columns < vocab_size, logits, -jnp.inf)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    mask = loss_mask.astype(jnp.float32)
    return jnp.sum((log_z - target_logit) * mask), jnp.sum(mask)


def _loss_sum(model: GPT, params, batch: dict, rng: jax.Array | None):
    deterministic = rng is None
    logits = model.apply({"params": params}, batch["input_ids"], batch.get("attention_mask"),
                         deterministic, method=GPT.padded_logits,
                         rngs=None if deterministic else {"dropout": rng})
    return cross_entropy_sum(logits, batch["targets"], batch["loss_mask"], model.config.vocab_size)


def make_train_step(model: GPT, optimizer: optax.GradientTransformation,
                    schedule: optax.Schedule, debug_nan_steps: Sequence[int] = ()) -> Callable:
    """Build ``train_step(state, batch)``; batch leaves are (grad_accum, batch, T).

    ``debug_nan_steps`` (tests only) turns those steps' gradients into NaN.
    """
    use_dropout = model.config.dropout > 0

    def micro_grads(params, micro_batch, rng):
        grad_fn = jax.value_and_grad(lambda p: _loss_sum(model, p, micro_batch, rng), has_aux=True)
        (loss_sum, count), grads = grad_fn(params)
        return grads, loss_sum, count

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        step_rng = jax.random.fold_in(state.rng, state.step)
        n_micro = batch["input_ids"].shape[0]
        rngs = jax.random.split(step_rng, n_micro) if use_dropout else [None] * n_micro
        if n_micro == 1:
            first = jax.tree.map(lambda x: x[0], batch)
            grads, loss_sum, count = micro_grads(state.params, first, rngs[0])
        else:
            def body(carry, xs):
                micro_batch, rng = xs
                g, l, c = micro_grads(state.params, micro_batch, rng)
                return jax.tree.map(jnp.add, carry, (g, l, c)), None
            zeros = (jax.tree.map(jnp.zeros_like, state.params), jnp.zeros(()), jnp.zeros(()))
            xs = (batch, rngs if use_dropout else None)
            (grads, loss_sum, count), _ = jax.lax.scan(body, zeros, xs)
        count = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / count, grads)
        if debug_nan_steps:
            poisoned = jnp.isin(state.step, jnp.asarray(debug_nan_steps))
            grads = jax.tree.map(lambda g: jnp.where(poisoned, jnp.nan, g), grads)

        applied_before = state.step - state.opt_state.total_notfinite
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            "loss": loss_sum / count,
            "tokens": count,
            "grad_norm": optax.tree.norm(grads),
            "lr": schedule(applied_before),
            "applied": opt_state.notfinite_count == 0,
            "nonfinite_streak": opt_state.notfinite_count,
        }
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        return new_state, metrics

    return train_step


def make_eval_step(model: GPT) -> Callable:
    """``eval_step(params, batch) -> (loss_sum, count)`` over all rows of the batch."""

    def eval_step(params, batch: dict) -> tuple[jax.Array, jax.Array]:
        flat = jax.tree.map(lambda x: x.reshape(-1, x.shape[-1]), batch)
        return _loss_sum(model, params, flat, None)

    return eval_step
