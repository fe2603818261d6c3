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
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers as policies

from jaxgpt2.config import Direction, GPTConfig
from jaxgpt2.errors import CheckpointError
from jaxgpt2.step import TrainState


class _DropReadOnlyNotice(logging.Filter):
    """orbax warns "Given directory is read only" on every read-only open; for sample.py
    and the other inference tools that is the intent, not news, so it is not printed."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Given directory is read only")


def _silence_read_only_notice() -> None:
    absl_logger = logging.getLogger("absl")
    if not any(isinstance(f, _DropReadOnlyNotice) for f in absl_logger.filters):
        absl_logger.addFilter(_DropReadOnlyNotice())


def model_config(meta: dict, step_folder: Path) -> GPTConfig:
    """The architecture recorded in a checkpoint's ``meta`` (read from ``step_folder``)."""
    try:
        model = meta["config"]["model"]
        return GPTConfig(**{f.name: model[f.name] for f in dataclasses.fields(GPTConfig)})
    except (KeyError, TypeError) as err:
        raise CheckpointError(f"{step_folder}: its meta holds no complete model config "
                              f"(missing {err}); is it a jaxgpt2 checkpoint?") from err


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
        if read_only:
            _silence_read_only_notice()
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "meta"))

    def save(self, state: TrainState, meta: dict, metrics: dict[str, float] | None = None) -> None:
        """Start writing a checkpoint for ``state.step`` (returns before the write ends);
        ``metrics`` (this step's evaluation) rank it for retention by ``best_metric``."""
        step = int(jax.device_get(state.step))
        best = (metrics or {}).get(self.best_metric)
        metrics = {self.best_metric: float(best)} if best is not None else None
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(_as_tree(state)), meta=ocp.args.JsonSave(meta)),
            metrics=metrics, force=True)

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

    def set_aside_after(self, step: int, folder: Path) -> list[int]:
        """Move the checkpoints after ``step`` into ``folder`` (kept, never deleted), so a
        run resumed from ``step`` can save those step numbers again; returns them."""
        later = [s for s in self.steps() if s > step]
        if later and jax.process_index() == 0:
            folder.mkdir(parents=True, exist_ok=True)
            for s in later:
                target, copies = folder / str(s), 1
                while target.exists():  # set aside before: keep both
                    target, copies = folder / f"{s}.{copies}", copies + 1
                (self.directory / str(s)).rename(target)
        if later and jax.process_count() > 1:
            multihost_utils.sync_global_devices("jaxgpt2_set_aside_checkpoints")
        self.manager.reload()
        return later

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

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
