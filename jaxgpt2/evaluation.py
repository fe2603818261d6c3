"""Evaluations run during training: a registry of named metrics.

At every ``train.eval_interval`` the loop calls each configured evaluation with the
current parameters and logs what it returns (``{"val_loss": 1.93}``). Adding one
(HellaSwag, say) is a class with ``metrics``, ``__call__`` and ``compile``, plus an entry
in ``EVALUATIONS`` that builds it when its config field asks for it; the loop, the logs
and checkpoint retention (``train.best_metric``) pick its metrics up by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

import jax

from jaxgpt2.config import Config
from jaxgpt2.data import STREAMS, BatchSource, Dataset, mean_loss
from jaxgpt2.hellaswag import (HellaSwagEvaluation, check_gpt2, crop_note, load_examples,
                               make_score_step, place_replicated)
from jaxgpt2.metrics import say
from jaxgpt2.model import GPT
from jaxgpt2.step import make_eval_step


class Evaluation(Protocol):
    """Scores parameters; ``metrics`` names what ``__call__`` returns. ``compile`` compiles
    what ``__call__`` will run from the parameters' shapes (``jax.ShapeDtypeStruct``
    leaves), ahead of the first evaluation (``jaxgpt2.ahead``)."""

    metrics: tuple[str, ...]

    def __call__(self, params: Any) -> dict[str, float]: ...

    def compile(self, params: Any) -> None: ...


@dataclass
class EvalContext:
    """What evaluations may need from the run: its config, model, data and placement.

    ``rows`` are this process' rows of each global batch; ``place`` puts a host batch
    onto the mesh; ``params_sharding`` and ``batch_sharding`` jit an evaluation step.
    """

    config: Config
    model: GPT
    dataset: Dataset
    rows: tuple[int, int]
    place: Callable[[dict], Any]
    params_sharding: Any
    batch_sharding: jax.sharding.Sharding
    replicated: jax.sharding.Sharding


@dataclass
class ValidationLoss:
    """Mean loss over ``train.eval_steps`` fixed validation batches: the same batches at
    every evaluation, so successive values are comparable."""

    eval_step: Callable
    source: BatchSource
    batches: int
    place: Callable[[dict], Any]
    metrics: tuple[str, ...] = ("val_loss",)

    def __call__(self, params: Any) -> dict[str, float]:
        loss, _ = mean_loss(self.eval_step, params, self.source, self.batches, self.place)
        return {"val_loss": loss}

    def compile(self, params: Any) -> None:
        self.eval_step.lower(params, self.place(self.source(0))).compile()


def validation_loss(ctx: EvalContext) -> ValidationLoss | None:
    train, data = ctx.config.train, ctx.config.data
    if not train.eval_steps:
        return None
    eval_step = jax.jit(make_eval_step(ctx.model),
                        in_shardings=(ctx.params_sharding, ctx.batch_sharding),
                        out_shardings=ctx.replicated)
    source = BatchSource(ctx.dataset.val, data.mode, data.batch_size, ctx.model.config.block_size,
                         1, train.seed, STREAMS["val"], *ctx.rows)
    return ValidationLoss(eval_step, source, train.eval_steps, ctx.place)


def hellaswag(ctx: EvalContext) -> HellaSwagEvaluation | None:
    """HellaSwag accuracy of the file ``train.hellaswag`` names, scored on replicated
    batches (correctness first: every device scores every row)."""
    path = ctx.config.train.hellaswag
    if not path:
        return None
    check_gpt2(ctx.dataset.meta, f"the training data ({ctx.dataset.path})")
    examples, block = load_examples(path), ctx.model.config.block_size
    if note := crop_note(examples, block):
        say(note)
    step = jax.jit(make_score_step(ctx.model), in_shardings=(ctx.params_sharding, ctx.replicated),
                   out_shardings=ctx.replicated)
    return HellaSwagEvaluation(step, examples, block, max(1, ctx.config.data.batch_size // 4),
                               place_replicated(ctx.replicated))


# Each builder returns its evaluation, or None when the run's config does not ask for it.
EVALUATIONS: dict[str, Callable[[EvalContext], Evaluation | None]] = {
    "val_loss": validation_loss,
    "hellaswag": hellaswag,
}


def make_evaluations(ctx: EvalContext) -> list[Evaluation]:
    return [e for build in EVALUATIONS.values() if (e := build(ctx)) is not None]
