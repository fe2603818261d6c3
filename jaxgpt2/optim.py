"""The optimizer: a registry of update rules inside one guarded chain, and its schedule.

Every run's optimizer is ``apply_if_finite(chain(clip_by_global_norm, <rule>))`` where
the rule comes from ``OPTIMIZERS[optim.name]`` (adamw, lion, adafactor, sgd, muon) and
follows the schedule from ``SCHEDULES[optim.schedule]`` (cosine, constant, linear, wsd,
inverse_sqrt). Adding an optimizer is one entry in ``OPTIMIZERS``, its name in
``config.OptimizerName`` and its fields in ``OptimConfig`` (with their rows in
``OptimConfig.FOR_OPTIMIZERS``): clipping, the weight-decay mask, the non-finite guard,
accumulation and loss scaling stay around it unchanged. Every rule decays the
``weight_decay_mask`` leaves by ``lr * weight_decay`` a step (decoupled, as AdamW).

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
import jax.numpy as jnp
import numpy as np
import optax
from optax.contrib import MuonDimensionNumbers, scale_by_muon

from jaxgpt2.config import OptimConfig, OptimizerName, ScheduleName

DECAYED_LEAVES = ("kernel", "embedding")
# Muon's leaves: every kernel, i.e. the blocks' weight matrices (the head is tied to
# ``wte``, an embedding). Everything else (embeddings, biases, LayerNorms) gets AdamW.
MUON_LEAVES = ("kernel",)
# ``c_attn``'s (C, 3C) kernel holds three matrices (queries, keys, values), which Muon
# orthogonalises apart, as separate (C, C) weights.
QKV_MODULE = "c_attn"


def weight_decay_mask(params) -> dict:
    """True for weight matrices and embeddings (``kernel``, ``embedding``), False for
    biases and LayerNorm parameters. Decided by name, not rank: stacked layers make
    biases 2-D."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: _leaf_name(path) in DECAYED_LEAVES, params)


def _leaf_name(path) -> str | None:
    """The dict key a leaf sits under (``kernel``, ``bias``, ``embedding``, ...)."""
    return getattr(path[-1], "key", None)


def _cosine(config: OptimConfig, decay_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to ``lr``, then cosine down to ``min_lr`` at ``decay_steps``
    (which counts the warmup, as nanoGPT's ``lr_decay_iters`` does)."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=config.lr, warmup_steps=config.warmup_steps,
        decay_steps=max(decay_steps, config.warmup_steps + 1), end_value=config.min_lr)


def _constant(config: OptimConfig, decay_steps: int) -> optax.Schedule:
    """Linear warmup, then ``lr`` held (fine-tuning recipes)."""
    return optax.join_schedules([_warmup(config), optax.constant_schedule(config.lr)],
                                [config.warmup_steps])


def _warmup(config: OptimConfig) -> optax.Schedule:
    """Linear from 0 to ``lr`` over ``warmup_steps`` (the first piece of a joined schedule)."""
    return optax.linear_schedule(0.0, config.lr, max(config.warmup_steps, 1))


def _linear(config: OptimConfig, decay_steps: int) -> optax.Schedule:
    """Linear warmup, then linear down to ``min_lr`` at ``decay_steps`` (counting the
    warmup, as the cosine does), then ``min_lr`` held."""
    decay = optax.linear_schedule(config.lr, config.min_lr,
                                  max(decay_steps - config.warmup_steps, 1))
    return optax.join_schedules([_warmup(config), decay], [config.warmup_steps])


def _wsd(config: OptimConfig, decay_steps: int) -> optax.Schedule:
    """Warmup-stable-decay: warmup, ``lr`` held, then the last ``decay_fraction`` of
    ``decay_steps`` decays to ``min_lr`` (``decay_shape``: linear, or 1-sqrt as Hägele et
    al. 2024 recommend). A decay that would start inside the warmup starts at its end."""
    decay_start = max(decay_steps - round(config.decay_fraction * decay_steps),
                      config.warmup_steps)
    length = max(decay_steps - decay_start, 1)
    if config.decay_shape == "linear":
        decay = optax.linear_schedule(config.lr, config.min_lr, length)
    else:
        decay = lambda step: config.min_lr + (config.lr - config.min_lr) * (
            1 - jnp.sqrt(jnp.clip(step / length, 0.0, 1.0)))
    return optax.join_schedules(
        [_warmup(config), optax.constant_schedule(config.lr), decay],
        [config.warmup_steps, decay_start])


def _inverse_sqrt(config: OptimConfig, decay_steps: int) -> optax.Schedule:
    """Linear warmup, then ``lr * sqrt(warmup_steps / step)`` (the Transformer paper's
    decay, with no end: ``decay_steps`` and ``min_lr`` do not apply)."""
    warmup = max(config.warmup_steps, 1)
    decay = lambda since_warmup: config.lr * jnp.sqrt(warmup / (since_warmup + warmup))
    return optax.join_schedules([_warmup(config), decay], [config.warmup_steps])


def _adamw(config: OptimConfig, schedule: optax.Schedule) -> optax.GradientTransformation:
    return optax.adamw(schedule, b1=config.b1, b2=config.b2, eps=config.eps,
                       weight_decay=config.weight_decay, mask=weight_decay_mask)


def _lion(config: OptimConfig, schedule: optax.Schedule) -> optax.GradientTransformation:
    """Lion (Chen et al. 2023): the sign of a momentum interpolation, so every step
    moves each weight by exactly ``lr``; it wants a 3-10x smaller ``lr`` than AdamW."""
    return optax.lion(schedule, b1=config.lion_b1, b2=config.lion_b2,
                      weight_decay=config.weight_decay, mask=weight_decay_mask)


def _adafactor(config: OptimConfig, schedule: optax.Schedule) -> optax.GradientTransformation:
    """Adafactor (Shazeer and Stern 2018): factored second moments, updates clipped by
    their RMS and, by default, scaled by each weight's RMS (``lr`` is a relative step).
    optax adds its weight decay after the learning rate, so it is given ``lr(t) *
    weight_decay`` to decay as every other rule does."""
    return optax.adafactor(
        schedule, decay_rate=config.adafactor_decay_rate,
        clipping_threshold=config.adafactor_clipping_threshold,
        multiply_by_parameter_scale=config.adafactor_multiply_by_parameter_scale,
        momentum=config.adafactor_momentum,
        weight_decay_rate=lambda count: config.weight_decay * schedule(count),
        weight_decay_mask=weight_decay_mask)


def _sgd(config: OptimConfig, schedule: optax.Schedule) -> optax.GradientTransformation:
    """SGD with (optionally Nesterov) momentum and decoupled weight decay (SGDW)."""
    return optax.chain(
        optax.trace(decay=config.sgd_momentum, nesterov=config.sgd_nesterov),
        optax.add_decayed_weights(config.weight_decay, weight_decay_mask),
        optax.scale_by_learning_rate(schedule))


def _muon(config: OptimConfig, schedule: optax.Schedule) -> optax.GradientTransformation:
    """Muon (Jordan et al. 2024, as modded-nanogpt uses it): Nesterov momentum
    orthogonalised by Newton-Schulz for every kernel, one matrix at a time (each layer of
    the stack, and q, k, v apart: see ``_on_matrices``), at ``muon_lr``; AdamW (the
    ``adamw`` rule, at ``lr``) for embeddings, the tied head, biases and LayerNorms."""
    muon_schedule = lambda count: schedule(count) * (config.muon_lr / config.lr)
    each_matrix = lambda tree: jax.tree.map(lambda _: MuonDimensionNumbers(-2, -1), tree)
    matrices = optax.chain(
        scale_by_muon(ns_steps=config.muon_ns_steps, beta=config.muon_momentum,
                      weight_dimension_numbers=each_matrix),
        _scale_by_width(),
        optax.add_decayed_weights(config.muon_weight_decay, weight_decay_mask),
        optax.scale_by_learning_rate(muon_schedule))
    return _on_matrices(optax.partition({"muon": matrices, "adamw": _adamw(config, schedule)},
                                        _muon_labels))


def _muon_labels(params) -> dict:
    """``muon`` for the weight matrices (``MUON_LEAVES``), ``adamw`` for the rest."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "muon" if _leaf_name(path) in MUON_LEAVES else "adamw", params)


def _scale_by_width() -> optax.GradientTransformation:
    """Scale each orthogonalised (..., in, out) update by sqrt(max(1, out / in)), as the
    reference Muon does, so wide-output matrices (``c_fc``) move as far per input."""
    return optax.stateless(lambda updates, params=None: jax.tree.map(
        lambda u: u * np.sqrt(max(1.0, u.shape[-1] / u.shape[-2])), updates))


def _on_matrices(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """``inner`` applied to a view in which every ``c_attn`` kernel (..., C, 3C) is the
    stack (..., 3, C, C) of its q, k and v matrices. Every kernel is then a batch of
    (in, out) matrices over its leading axes (layers, and q/k/v), which Muon
    orthogonalises one by one; the updates come back in the parameters' layout."""
    def init(params):
        return inner.init(_split_qkv(params))

    def update(updates, state, params=None):
        view = None if params is None else _split_qkv(params)
        updates, state = inner.update(_split_qkv(updates), state, view)
        return _join_qkv(updates), state

    return optax.GradientTransformation(init, update)


def _split_qkv(tree):
    """``tree`` with every ``c_attn`` kernel (..., C, 3C) viewed as (..., 3, C, C)."""
    def split(path, x):
        if not _is_qkv(path):
            return x
        *lead, c_in, c_out = x.shape
        return x.reshape(*lead, c_in, 3, c_out // 3).swapaxes(-3, -2)
    return jax.tree_util.tree_map_with_path(split, tree)


def _join_qkv(tree):
    """The inverse of ``_split_qkv``: (..., 3, C, C) back to (..., C, 3C)."""
    def join(path, x):
        if not _is_qkv(path):
            return x
        *lead, three, c_in, c_out = x.shape
        return x.swapaxes(-3, -2).reshape(*lead, c_in, three * c_out)
    return jax.tree_util.tree_map_with_path(join, tree)


def _is_qkv(path) -> bool:
    """Whether a leaf is a ``c_attn`` kernel, the q, k and v matrices side by side."""
    names = [getattr(k, "key", None) for k in path]
    return _leaf_name(path) == "kernel" and QKV_MODULE in names


SCHEDULES: dict[str, Callable[[OptimConfig, int], optax.Schedule]] = {
    "cosine": _cosine,
    "constant": _constant,
    "linear": _linear,
    "wsd": _wsd,
    "inverse_sqrt": _inverse_sqrt,
}
OPTIMIZERS: dict[str, Callable[[OptimConfig, optax.Schedule], optax.GradientTransformation]] = {
    "adamw": _adamw,
    "lion": _lion,
    "adafactor": _adafactor,
    "sgd": _sgd,
    "muon": _muon,
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
