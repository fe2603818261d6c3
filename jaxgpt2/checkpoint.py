"""Checkpoints through orbax's ``CheckpointManager``.

Each checkpoint is a step folder with two items: ``state`` (params, optimizer state with
the non-finite counters, step, RNG key data, and a float16 run's loss scale; written by
every process, sharded) and ``meta`` (JSON: the resolved config, tokenizer identity and
the data position). Saves are asynchronous (training continues while files are written)
and atomic (orbax writes to a temporary folder and renames it when complete, so a crash
mid-save leaves no checkpoint that looks finished). Retention keeps the latest ``keep``
plus the best by one evaluation metric (``train.best_metric``, lower or higher better).

The trainer and the inference tools (``jaxgpt2.load``) read through the same class, so a
damaged checkpoint is reported the same way everywhere: as a ``CheckpointError`` naming
the step folder and the newest earlier checkpoint, never as orbax's own exception.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from jaxgpt2.config import Direction, GPTConfig
from jaxgpt2.errors import CheckpointError
from jaxgpt2.step import TrainState


def finished_steps(directory: str | Path) -> list[int]:
    """The finished checkpoints' steps in ``directory``, from a listing alone. Opening a
    ``CheckpointManager`` would do too, but it synchronises all processes, and this is
    asked before they agree on anything: a process that saw the folder appear (made by
    process 0) would enter a barrier the others never reach."""
    if not Path(directory).is_dir():
        return []
    return sorted(m.step for m in ocp.path.step.standard_name_format().find_all(directory))


class _DropOrbaxNoise(logging.Filter):
    """Drops orbax's log records that jaxgpt2 reports better itself: the "Given directory
    is read only" warning of every read-only open (the inference tools' intent, not news),
    and the error logs, each with a traceback, of a failed background save: orbax's own,
    and asyncio's "exception was never retrieved" for its abandoned writes (raised as one
    CheckpointError line instead; a full disk otherwise prints pages)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith("Given directory is read only"):
            return False
        if record.name == "asyncio":
            return not ("exception was never retrieved" in message and "orbax" in message)
        return not (record.levelno >= logging.ERROR and "orbax" in record.pathname)


def _hide_closed_loop_callbacks() -> None:
    """After a failed save, TensorStore's late write callbacks find orbax's event loop
    closed and each report a "RuntimeError: Event loop is closed" traceback through
    ``sys.unraisablehook``, burying the one-line CheckpointError; only those are hidden."""
    previous = sys.unraisablehook
    if getattr(previous, "hides_closed_loop", False):
        return

    def hook(unraisable) -> None:
        value = unraisable.exc_value
        if not (isinstance(value, RuntimeError) and str(value) == "Event loop is closed"):
            previous(unraisable)

    hook.hides_closed_loop = True
    sys.unraisablehook = hook


def _filter_orbax_logs() -> None:
    for name in ("absl", "asyncio"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropOrbaxNoise) for f in logger.filters):
            logger.addFilter(_DropOrbaxNoise())


def model_config(meta: dict, step_folder: Path) -> GPTConfig:
    """The architecture recorded in a checkpoint's ``meta`` (read from ``step_folder``)."""
    try:
        model = meta["config"]["model"]
        return GPTConfig(**{f.name: model[f.name] for f in dataclasses.fields(GPTConfig)})
    except (KeyError, TypeError) as err:
        raise CheckpointError(f"{step_folder}: its meta holds no complete model config "
                              f"(missing {err}); is it a jaxgpt2 checkpoint?") from err


def _os_reason(err: BaseException) -> str:
    """The operating system's reason inside a TensorStore/orbax error ("No space left on
    device"), else the error's first line."""
    text = str(err)
    code = re.search(r"os_error_code='(\d+)'", text)
    if code:
        return os.strerror(int(code.group(1)))
    return (text.strip().splitlines() or [type(err).__name__])[0][:200]


def _as_tree(state: TrainState) -> dict[str, Any]:
    tree = {"step": state.step, "params": state.params, "opt_state": state.opt_state,
            "rng": state.rng}
    if state.loss_scale is not None:  # float16 runs only
        tree["loss_scale"] = state.loss_scale
    return tree


class Checkpointer:
    """Saves and restores train states under ``directory`` (``<out_dir>/checkpoints``).

    ``read_only`` opens an existing folder for reading alone: nothing is created, and no
    retention or temporary-folder cleanup touches a run that may still be writing.
    """

    def __init__(self, directory: str | Path, keep: int = 2, read_only: bool = False,
                 best_metric: str = "val_loss", best_direction: Direction = "min") -> None:
        self.directory = Path(directory).absolute()
        self.best_metric = best_metric
        sign = -1.0 if best_direction == "min" else 1.0  # BestN keeps the largest
        preservation = policies.AnyPreservationPolicy([
            policies.LatestN(n=keep),
            policies.BestN(get_metric_fn=lambda m: sign * m[best_metric], n=1,
                           keep_checkpoints_without_metrics=False),
        ])
        options = ocp.CheckpointManagerOptions(
            preservation_policy=preservation, enable_async_checkpointing=True,
            create=not read_only, cleanup_tmp_directories=not read_only, read_only=read_only,
            save_interval_steps=0 if read_only else 1)
        _filter_orbax_logs()
        _hide_closed_loop_callbacks()
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "meta"))
        self._last_save: tuple[int, int] | None = None  # (step, bytes) of the latest save
        self._unchecked = False  # a save started and not yet seen to finish
        self._failed = False

    def save(self, state: TrainState, meta: dict, metrics: dict[str, float] | None = None) -> None:
        """Start writing a checkpoint for ``state.step`` (returns before the write ends);
        ``metrics`` (this step's evaluation) rank it for retention by ``best_metric``."""
        step = int(jax.device_get(state.step))
        best = (metrics or {}).get(self.best_metric)
        metrics = {self.best_metric: float(best)} if best is not None else None
        tree = _as_tree(state)
        size = sum(x.nbytes for x in jax.tree.leaves(tree))
        self.wait()  # orbax would wait for the previous save too; its failure is its own
        self._last_save, self._unchecked = (step, size), True
        with self._reporting_write_errors():
            self.manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta)),
                metrics=metrics, force=True)

    def check_for_errors(self) -> None:
        """Raise the CheckpointError of a background save that failed (cheap: the loop
        calls it every step, so a full disk stops the run at once, not at the next save)."""
        if self._unchecked and not self.manager.is_saving_in_progress():
            with self._reporting_write_errors():
                self.manager.wait_until_finished()  # returns at once; raises its failure
            self._unchecked = False

    @contextmanager
    def _reporting_write_errors(self) -> Iterator[None]:
        """A failed write as one line: where, why, how much room a checkpoint needs, and
        the last complete checkpoint to resume from; orbax's own error runs to pages."""
        try:
            yield
        except Exception as err:
            if self._last_save is None:
                raise
            self._failed = True
            step, size = self._last_save
            self._close_after_failure()
            self.manager.reload()
            done = [s for s in self.steps() if s < step]
            free = shutil.disk_usage(self.directory).free
            last = (f"the last complete checkpoint is step {done[-1]}: resuming from it is safe "
                    "(train.resume=true)" if done else "no checkpoint of this run is complete")
            raise CheckpointError(
                f"saving checkpoint {self.directory / str(step)} failed ({_os_reason(err)}); a "
                f"checkpoint needs about {size / 2**20:,.1f} MiB and {free / 2**20:,.1f} MiB "
                f"are free there; {last}") from None

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def read_meta(self, step: int) -> dict:
        try:
            return self.manager.restore(
                step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception as err:  # a missing step or a damaged meta item
            raise self._unreadable(step, err) from err

    def restore(self, step: int, target: TrainState, shardings: Any) -> tuple[TrainState, dict]:
        """Restore ``step`` into the shapes and shardings of ``target`` (may be abstract),
        on whatever mesh ``shardings`` describes."""
        abstract = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
            _as_tree(target), _as_tree(shardings))
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        except Exception as err:  # orbax raises many types for damaged files
            raise self._unreadable(step, err) from err
        tree = restored["state"]
        return TrainState(step=tree["step"], params=tree["params"], opt_state=tree["opt_state"],
                          rng=tree["rng"], loss_scale=tree.get("loss_scale")), restored["meta"]

    def read_model_config(self, step: int) -> GPTConfig:
        """The architecture ``step`` was trained with, from its ``meta``."""
        return model_config(self.read_meta(step), self.directory / str(step))

    def read_params(self, step: int, abstract_params: Any) -> Any:
        """Only ``params`` of ``step``'s state, shaped like ``abstract_params`` and placed
        on the default device: inference needs neither the Adam moments (twice the
        parameters' memory) nor the training mesh."""
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        abstract = {"params": abstract_params}
        restore_args = jax.tree.map(lambda _: ocp.ArrayRestoreArgs(sharding=device), abstract)
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(abstract, restore_args=restore_args,
                                             partial_restore=True)))
        except Exception as err:  # orbax raises many types for damaged files
            raise self._unreadable(step, err) from err
        return restored["state"]["params"]

    def reload(self) -> None:
        """Read the folder again after checkpoints were moved in or out of it."""
        self.manager.reload()

    def _unreadable(self, step: int, err: Exception) -> CheckpointError:
        earlier = [s for s in self.steps() if s < step]
        hint = (f"; the previous checkpoint is {self.directory / str(earlier[-1])} (resume "
                f"from it with train.resume_step={earlier[-1]}, or pass that folder to "
                "sample.py, evaluate or export)" if earlier else "")
        # orbax's messages can run to dozens of lines (a whole TensorStore spec); the
        # first line says what failed.
        reason = (str(err).strip().splitlines() or [""])[0][:300]
        return CheckpointError(f"checkpoint {self.directory / str(step)} cannot be read "
                               f"({type(err).__name__}: {reason}){hint}")

    def _close_after_failure(self) -> None:
        """Let the failed save's other writes finish before the process exits: left
        running, their callbacks find orbax's event loop closed and print tracebacks."""
        try:
            self.manager.close()
        except Exception:  # the same failure again; it is being reported
            pass

    def wait(self) -> None:
        """Block until the last save is on disk; after a reported failure, return at once
        (its error has been raised already)."""
        if self._failed:
            return
        with self._reporting_write_errors():
            self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
