"""What a run reports: the progress display, throughput, and the metric writers.

The loop hands the ``Reporter`` each step's device metrics (one step late, so the host
never stalls the device) and each evaluation's results; the reporter reads them, keeps
the throughput window, updates the display and fans every record out to its writers.
Adding a sink (TensorBoard, W&B) is one ``Writer`` class and one entry in ``WRITERS``,
switched on by its config field; the loop does not change.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Callable, Protocol

import jax
from tqdm import tqdm

from jaxgpt2.config import TrainConfig


def say(message: str) -> None:
    """A line for the person watching (process 0 only), printed above the progress bar."""
    if jax.process_index() == 0:
        tqdm.write(message)


class Writer(Protocol):
    """A sink for metric records: ``{"step": N, name: value, ...}``."""

    def write(self, record: dict) -> None: ...

    def close(self) -> None: ...


class JsonlWriter:
    """``metrics.jsonl``: one JSON object per line, always written."""

    def __init__(self, out_dir: Path, train: TrainConfig) -> None:
        self.file = open(out_dir / "metrics.jsonl", "a")

    def write(self, record: dict) -> None:
        """One line; a non-finite number is written as ``null``, since bare ``NaN`` is not
        JSON and strict readers (JavaScript, Go, serde) reject the whole file."""
        record = {k: None if isinstance(v, float) and not math.isfinite(v) else v
                  for k, v in record.items()}
        self.file.write(json.dumps(record, allow_nan=False) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


# (is it on for this run, how to make it). Writers are made by process 0 only.
WRITERS: list[tuple[Callable[[TrainConfig], bool], Callable[[Path, TrainConfig], Writer]]] = [
    (lambda train: True, JsonlWriter),
]


def make_writers(out_dir: Path, train: TrainConfig) -> list[Writer]:
    if jax.process_index() != 0:
        return []
    return [make(out_dir, train) for enabled, make in WRITERS if enabled(train)]


class ThroughputWindow:
    """Tokens per second between log lines, timed when step results are read.

    The loop reads a step's results right after dispatching the next step. Under gradient
    accumulation XLA:GPU runs the accumulation loop with the host waiting, so that read
    lands partway into the next step; it always does, so the time between two such
    reads is whole steps. A read forced before an eval, a save or the end has no next
    step behind it and lands at the end of its own step, so a window closed by it is
    timed up to the last ordinary read (``docs/performance.md`` has what it fixed).
    """

    def __init__(self) -> None:
        self.last_rate: float | None = None
        self.restart()

    def restart(self) -> None:
        self.start = self.seen = time.perf_counter()
        self.tokens = 0.0

    def add(self, tokens: float) -> None:
        self.tokens += tokens
        self.seen = time.perf_counter()

    def rate(self, forced_tokens: float = 0.0) -> float:
        if self.tokens:
            self.last_rate = self.tokens / max(self.seen - self.start, 1e-9)
        elif self.last_rate is None:  # a window of one forced read, the run's first
            self.last_rate = forced_tokens / max(time.perf_counter() - self.start, 1e-9)
        return self.last_rate


class Reporter:
    """Reads step metrics, keeps the throughput window and the progress bar, and writes
    a record every ``train.log_interval`` steps (and whenever a read is ``force``d before
    an evaluation, a save or the end) to every writer."""

    def __init__(self, train: TrainConfig, writers: list[Writer], start_step: int) -> None:
        self.train, self.writers = train, writers
        self.throughput = ThroughputWindow()
        self.bar = tqdm(total=train.max_steps, initial=start_step, dynamic_ncols=True,
                        disable=not train.progress or jax.process_index() != 0)

    def step_done(self) -> None:
        self.bar.update(1)

    def read_step(self, step: int, device_metrics: dict, force: bool = False) -> dict:
        """Fetch a finished step's metrics to the host, report skipped updates, log on
        the interval; returns the host metrics."""
        m = jax.device_get(device_metrics)
        if not force:
            self.throughput.add(float(m["tokens"]))
        if bool(m.get("overflow", False)):
            say(f"step {step}: float16 gradient overflow, update skipped; loss scale now "
                f"{float(m['loss_scale']):g}")
        elif not bool(m["applied"]):
            say(f"step {step}: non-finite gradient, update skipped "
                f"({int(m['nonfinite_streak'])} in a row)")
        if force or step % self.train.log_interval == 0:
            self._log(step, m, float(m["tokens"]) if force else 0.0)
        return m

    def _log(self, step: int, m: dict, forced_tokens: float) -> None:
        record = {"step": step, "train_loss": float(m["loss"]), "lr": float(m["lr"]),
                  "grad_norm": float(m["grad_norm"]),
                  "tokens_per_sec": self.throughput.rate(forced_tokens)}
        if "loss_scale" in m:
            record["loss_scale"] = float(m["loss_scale"])
        self.write(record)
        self.bar.set_postfix(loss=f"{record['train_loss']:.4f}",
                             tok_s=f"{record['tokens_per_sec']:,.0f}")
        self.throughput.restart()

    def write(self, record: dict) -> None:
        for writer in self.writers:
            writer.write(record)

    def evaluated(self, step: int, results: dict[str, float]) -> None:
        """An evaluation's named metrics: written, and shown as one line."""
        self.write({"step": step, **results})
        say(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in results.items()))

    def close(self) -> None:
        self.bar.close()
        for writer in self.writers:
            writer.close()
