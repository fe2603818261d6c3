"""The loss and the pure ``train_step``/``eval_step`` functions the trainer jits.

``train_step(state, batch) -> (state, metrics)`` is a pure function, so it can be jitted
with explicit shardings and donated buffers, and tested without the loop around it.
Gradient accumulation is a ``lax.scan`` over micro-batches inside the step: the
gradient is of the token-summed loss, divided once by the total count of real tokens,
so accumulating 4 micro-batches of B rows equals one batch of 4B rows.

A float16 run carries a ``LossScale`` in its state (``jaxgpt2.loss_scale``): the loss is
scaled before the backward pass, the gradient unscaled after it, and an overflowing
step is skipped whole (parameters and optimizer state kept) while the scale halves.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import optax

from jaxgpt2.loss import masked_sum
from jaxgpt2.loss_scale import LossScale, all_finite
from jaxgpt2.model import GPT
from jaxgpt2.optim import Optimizer

# XLA:GPU options for jitting the train step (docs/performance.md). The dot merger joined
# c_attn's three products back into one and sliced its output (the three products are why
# ``model.QKVProjection`` splits them); cuBLAS for every product, not XLA's Triton GEMMs,
# was faster too and compiles sooner. H200, GPT-2 124M: 0.3-0.5 ms each of a 58 ms step.
GPU_COMPILER_OPTIONS = {"xla_gpu_dot_merger_threshold_mb": 0, "xla_gpu_enable_triton_gemm": False}


class TrainState(flax.struct.PyTreeNode):
    """Everything a step changes. ``step`` counts attempted steps (skipped ones too);
    ``rng`` is raw ``uint32[2]`` key data so it checkpoints as a plain array;
    ``loss_scale`` is ``None`` unless the run computes in float16."""

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array
    loss_scale: LossScale | None = None


def create_train_state(params: Any, optimizer: Optimizer, seed: int,
                       loss_scale: float | None = None) -> TrainState:
    """A fresh state; ``loss_scale`` (the initial scale) turns on dynamic loss scaling."""
    scale = None if loss_scale is None else LossScale.create(loss_scale)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=optimizer.init(params), rng=jax.random.PRNGKey(seed),
                      loss_scale=scale)


def _loss_sum(model: GPT, params, batch: dict, rng: jax.Array | None):
    deterministic = rng is None
    nll = model.apply({"params": params}, batch["input_ids"], batch["targets"],
                      batch.get("attention_mask"), deterministic, method=GPT.token_nll,
                      rngs=None if deterministic else {"dropout": rng})
    return masked_sum(nll, batch["loss_mask"])


def step_compiler_options() -> dict[str, Any]:
    """``compiler_options`` for the train step's ``jax.jit``: ``GPU_COMPILER_OPTIONS`` on a
    GPU, none elsewhere (another backend's compiler need not know GPU options)."""
    return dict(GPU_COMPILER_OPTIONS) if jax.default_backend() == "gpu" else {}


def jit_train_step(train_step: Callable, **jit_kwargs: Any) -> Callable:
    """``jax.jit`` of a train step (``jit_kwargs``: shardings): the state donated and, on
    a GPU, ``GPU_COMPILER_OPTIONS`` applied; the one place every caller jits it."""
    return jax.jit(train_step, donate_argnums=0, compiler_options=step_compiler_options(),
                   **jit_kwargs)


def make_train_step(model: GPT, optimizer: Optimizer, debug_nan_steps: Sequence[int] = (),
                    loss_scale_interval: int = 2000) -> Callable:
    """Build ``train_step(state, batch)``; batch leaves are (grad_accum, batch, T).

    ``debug_nan_steps`` (tests only) turns those steps' gradients into NaN.
    ``loss_scale_interval`` is how many finite steps double a float16 run's loss scale.
    """
    use_dropout = model.config.dropout > 0

    def micro_grads(params, micro_batch, rng, multiplier):
        def scaled_loss(p):
            loss_sum, count = _loss_sum(model, p, micro_batch, rng)
            return loss_sum * multiplier, (loss_sum, count)
        (_, (loss_sum, count)), grads = jax.value_and_grad(scaled_loss, has_aux=True)(params)
        return grads, loss_sum, count

    def accumulate(params, batch: dict, step_rng: jax.Array, multiplier):
        """Summed gradients, loss and real-token count over the micro-batches."""
        n_micro = batch["input_ids"].shape[0]
        rngs = jax.random.split(step_rng, n_micro) if use_dropout else [None] * n_micro
        if n_micro == 1:
            first = jax.tree.map(lambda x: x[0], batch)
            return micro_grads(params, first, rngs[0], multiplier)

        def body(carry, xs):
            micro_batch, rng = xs
            g, l, c = micro_grads(params, micro_batch, rng, multiplier)
            return jax.tree.map(jnp.add, carry, (g, l, c)), None
        zeros = (jax.tree.map(jnp.zeros_like, params), jnp.zeros(()), jnp.zeros(()))
        xs = (batch, rngs if use_dropout else None)
        return jax.lax.scan(body, zeros, xs)[0]

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        scaler = state.loss_scale
        _, rows, length = batch["input_ids"].shape
        # The loss is a token sum; scaling it by scale / positions gives gradients the
        # size a mean loss times the scale would, the convention loss scales are set by.
        multiplier = 1.0 if scaler is None else scaler.scale / (rows * length)
        step_rng = jax.random.fold_in(state.rng, state.step)
        grads, loss_sum, count = accumulate(state.params, batch, step_rng, multiplier)
        count = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / (count * multiplier), grads)
        if debug_nan_steps:
            poisoned = jnp.isin(state.step, jnp.asarray(debug_nan_steps))
            grads = jax.tree.map(lambda g: jnp.where(poisoned, jnp.nan, g), grads)
        grad_norm = optax.tree.norm(grads)

        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        overflow = jnp.zeros((), bool)
        if scaler is not None:
            grads_finite = all_finite(grads)
            overflow = scaler.is_overflow(loss_sum, grads_finite)
            # An overflow keeps the old parameters and optimizer state whole, the
            # non-finite counters included, so it never counts as a non-finite step.
            params, opt_state = jax.tree.map(lambda new, old: jnp.where(overflow, old, new),
                                             (params, opt_state), (state.params, state.opt_state))
            scaler = scaler.update(grads_finite, loss_scale_interval)

        metrics = {
            "loss": loss_sum / count,
            "tokens": count,
            "grad_norm": grad_norm,
            "lr": optimizer.learning_rate(state.opt_state, state.step),
            "applied": optimizer.update_applied(opt_state) & ~overflow,
            "nonfinite_streak": optimizer.nonfinite_streak(opt_state),
        }
        if scaler is not None:
            metrics.update(overflow=overflow, loss_scale=scaler.scale)
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                             loss_scale=scaler), metrics

    return train_step


def make_eval_step(model: GPT) -> Callable:
    """``eval_step(params, batch) -> (loss_sum, count)`` over all rows of the batch."""

    def eval_step(params, batch: dict) -> tuple[jax.Array, jax.Array]:
        flat = jax.tree.map(lambda x: x.reshape(-1, x.shape[-1]), batch)
        return _loss_sum(model, params, flat, None)

    return eval_step
