"""Resume policy: which checkpoint a run continues from, and whether it may.

Decided before anything is written: asking to resume a folder without checkpoints is an
error (a mistyped folder would otherwise train from scratch), a fresh run refuses a
folder that holds another run's checkpoints (its saves would collide with theirs, or its
retention delete them), and a checkpoint made with another architecture, tokenizer or
optimizer is refused by name. Everything else (steps, cadence, schedule length, batch
size) may change and is logged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxgpt2.checkpoint import Checkpointer, finished_steps
from jaxgpt2.config import GPTConfig, TrainConfig
from jaxgpt2.errors import ConfigError
from jaxgpt2.loss_scale import LossScale
from jaxgpt2.metrics import say
from jaxgpt2.step import TrainState

# Fields that define what a checkpoint *is*; changing them on resume is an error. The
# optimizer's name is one: its state (moments, factored statistics) does not carry over.
INCOMPATIBLE_ON_RESUME = ("model.vocab_size", "model.block_size", "model.n_layer",
                          "model.n_head", "model.n_embd", "model.bias", "data.tokenizer",
                          "optim.name")
# Checkpoints written before a field existed lack it; they were made with this value.
_ASSUMED_WHEN_ABSENT = {"optim.name": "adamw"}
# Where checkpoints after a resumed step are moved (kept, never deleted): a run resumed
# from an earlier step saves those step numbers again.
SUPERSEDED = "superseded_checkpoints"
# Fields that name the resume itself, not the run; never reported as changed.
_RESUME_FIELDS = ("resume", "resume_step")


def existing_steps(out_dir: Path) -> list[int]:
    """Finished checkpoints in ``out_dir``, read without creating, cleaning or waiting for
    anything (see ``checkpoint.finished_steps``)."""
    return finished_steps(out_dir / "checkpoints")


def agreed_resume_step(step: int | None) -> int | None:
    """Process 0's choice, on every process: each one lists the folder itself, and a
    listing that lags on one host (a network file system's cache) must not make it
    restore another step, or start fresh, while the others resume."""
    if jax.process_count() == 1:
        return step
    chosen = int(multihost_utils.broadcast_one_to_all(np.int32(-1 if step is None else step)))
    return None if chosen < 0 else chosen


def choose_resume_step(train: TrainConfig, out_dir: Path) -> int | None:
    """The step to restore (``train.resume_step``, or the latest with ``train.resume``),
    or None for a fresh run; see the module docstring for what is refused."""
    existing = existing_steps(out_dir)
    listed = ", ".join(map(str, existing))
    if train.resume_step is not None:
        if train.resume_step not in existing:
            raise ConfigError(f"train.resume_step={train.resume_step}: {out_dir} has no "
                              f"checkpoint for that step (it has: {listed or 'none'})")
        return train.resume_step
    if train.resume:
        if not existing:
            raise ConfigError(f"train.resume=true, but {out_dir} holds no checkpoints; "
                              "check train.out_dir (or --resume RUN_DIR), or drop "
                              "train.resume to start a new run there")
        return existing[-1]
    if existing:
        raise ConfigError(f"{out_dir} already holds checkpoints of a run (steps {listed}); "
                          "continue it with train.resume=true, or start over in another "
                          "train.out_dir")
    return None


def saved_model_config(out_dir: Path, step: int) -> GPTConfig:
    """The architecture a checkpoint was trained with (for resuming a fine-tune without
    the ``model.init_from`` folder it started from)."""
    reader = Checkpointer(out_dir / "checkpoints", read_only=True)
    try:
        return reader.read_model_config(step)
    finally:
        reader.close()


def check_compatible(saved: dict, current: dict) -> None:
    """Refuse a checkpoint whose ``INCOMPATIBLE_ON_RESUME`` fields differ from the run's."""
    diffs = []
    for dotted in INCOMPATIBLE_ON_RESUME:
        section, key = dotted.split(".")
        a = saved.get(section, {}).get(key, _ASSUMED_WHEN_ABSENT.get(dotted))
        b = current.get(section, {}).get(key)
        if a != b:
            diffs.append(f"{dotted}: checkpoint {a!r}, now {b!r}")
    if diffs:
        raise ConfigError("cannot resume: the checkpoint was made with a different setup: "
                          + "; ".join(diffs))


def changed_fields(saved: dict, current: dict) -> list[str]:
    """``section.key changed from A to B`` for every other field that differs."""
    changes = []
    for section, values in current.items():
        if not isinstance(values, dict):
            continue
        for key, value in values.items():
            old = saved.get(section, {}).get(key)
            if old != value and key not in _RESUME_FIELDS:
                changes.append(f"{section}.{key} changed from {old!r} to {value!r}")
    return changes


def resume(checkpointer: Checkpointer, step: int, run_config: dict, abstract: TrainState,
           shardings_for: Callable[[TrainState], Any], loss_scale: float | None,
           replicated: jax.sharding.Sharding) -> TrainState:
    """Check ``step``'s checkpoint against the run's resolved config, restore it, log
    what changed, and set later checkpoints aside (see ``restore_state``)."""
    saved = checkpointer.read_meta(step)["config"]
    check_compatible(saved, run_config)
    state = restore_state(checkpointer, step, saved, abstract, shardings_for, loss_scale,
                          replicated)
    for change in changed_fields(saved, run_config):
        say(f"resume: {change}")
    say(f"resumed from {checkpointer.directory / str(step)}")
    out_dir = checkpointer.directory.parent
    set_aside = set_aside_after(checkpointer, step, out_dir / SUPERSEDED)
    if set_aside:
        say(f"checkpoints after step {step} (steps {', '.join(map(str, set_aside))}) moved "
            f"to {out_dir / SUPERSEDED}, so this run can save those steps again")
    return state


def restore_state(checkpointer: Checkpointer, step: int, saved: dict, abstract: TrainState,
                  shardings_for: Callable[[TrainState], Any], loss_scale: float | None,
                  replicated: jax.sharding.Sharding) -> TrainState:
    """Restore ``step`` (whose resolved config is ``saved``) onto the shardings
    ``shardings_for`` gives, then add or drop the loss scale as the run moves into
    (``loss_scale``, the initial scale) or out of float16."""
    saved_scaled = saved.get("model", {}).get("dtype") == "float16"
    target = abstract.replace(loss_scale=jax.eval_shape(lambda: LossScale.create(1.0))
                              if saved_scaled else None)
    state, _ = checkpointer.restore(step, target, shardings_for(target))
    if saved_scaled and loss_scale is None:
        state = state.replace(loss_scale=None)
    elif loss_scale is not None and not saved_scaled:
        state = state.replace(loss_scale=jax.device_put(LossScale.create(loss_scale), replicated))
    return state


def set_aside_after(checkpointer: Checkpointer, step: int, folder: Path) -> list[int]:
    """Move the checkpoints after ``step`` into ``folder`` (kept, never deleted), so a run
    resumed from ``step`` can save those step numbers again; returns them."""
    later = [s for s in checkpointer.steps() if s > step]
    if later and jax.process_index() == 0:
        folder.mkdir(parents=True, exist_ok=True)
        for s in later:
            target, copies = folder / str(s), 1
            while target.exists():  # set aside before: keep both
                target, copies = folder / f"{s}.{copies}", copies + 1
            (checkpointer.directory / str(s)).rename(target)
    if later and jax.process_count() > 1:
        multihost_utils.sync_global_devices("jaxgpt2_set_aside_checkpoints")
    checkpointer.reload()
    return later
