"""What a run reports: the progress display, throughput, and the metric writers.

The loop hands the ``Reporter`` each step's device metrics (one step late, so the host
never stalls the device) and each evaluation's results; the reporter reads them, keeps
the throughput window, updates the display and fans every record out to its writers.
Adding a sink (TensorBoard, W&B) is one ``Writer`` class and one entry in ``WRITERS``,
switched on by its config field; the loop does not change.
"""

from __future__ import annotations

import html
import json
import math
import netrc
import os
import sys
import time
import uuid
from pathlib import Path
from contextlib import contextmanager
from typing import Callable, Iterator, Protocol

import jax
from tqdm import tqdm

from jaxgpt2.config import TrainConfig
from jaxgpt2.errors import InputError
from jaxgpt2.plot import plot_runs


def say(message: str) -> None:
    """A line for the person watching (process 0 only), printed above the progress bar."""
    if jax.process_index() == 0:
        tqdm.write(message)


class Writer(Protocol):
    """A sink for metric records (``{"step": N, name: value, ...}``) and sampled text."""

    def write(self, record: dict) -> None: ...

    def write_text(self, step: int, tag: str, text: str) -> None: ...

    def close(self) -> None: ...


class JsonlWriter:
    """``metrics.jsonl``: one JSON object per line, always written.

    A run resumed at step S continues the file after dropping its rows past S (the steps
    about to be replayed), so a reader never has to de-duplicate.
    """

    def __init__(self, out_dir: Path, train: TrainConfig, start_step: int) -> None:
        path = out_dir / "metrics.jsonl"
        if path.exists():
            keep_rows_up_to(path, start_step)
        self.file = open(path, "a")

    def write(self, record: dict) -> None:
        """One line; a non-finite number is written as ``null``, since bare ``NaN`` is not
        JSON and strict readers (JavaScript, Go, serde) reject the whole file."""
        record = {k: None if isinstance(v, float) and not math.isfinite(v) else v
                  for k, v in record.items()}
        self.file.write(json.dumps(record, allow_nan=False) + "\n")
        self.file.flush()

    def write_text(self, step: int, tag: str, text: str) -> None:
        """Samples have their own file, ``samples.txt``."""

    def close(self) -> None:
        self.file.close()


class TensorBoardWriter:
    """TensorBoard event files under ``<out_dir>/tensorboard`` (``train.tensorboard``).

    A resumed run purges the events after its start step, as the JSONL file drops its rows.
    """

    def __init__(self, out_dir: Path, train: TrainConfig, start_step: int) -> None:
        import tensorboardX  # optional; the config checked it is installed

        self.writer = tensorboardX.SummaryWriter(str(out_dir / "tensorboard"),
                                                 purge_step=start_step + 1 if start_step else None)

    def write(self, record: dict) -> None:
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(key, value, record["step"])
        self.writer.flush()

    def write_text(self, step: int, tag: str, text: str) -> None:
        self.writer.add_text(tag, text.replace("\n", "  \n"), step)  # markdown line breaks

    def close(self) -> None:
        self.writer.close()


class WandbWriter:
    """Weights & Biases (``train.wandb_project``): online when an API key is configured
    (``WANDB_API_KEY`` or ``wandb login``'s netrc entry), offline files under
    ``<out_dir>/wandb`` otherwise; never a login prompt. A resumed run continues the same
    W&B run (its id is kept in ``<out_dir>/wandb_id``)."""

    def __init__(self, out_dir: Path, train: TrainConfig, start_step: int) -> None:
        import wandb  # optional; the config checked it is installed

        id_file = out_dir / "wandb_id"
        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:8]
        id_file.write_text(run_id)
        mode = "online" if _wandb_key_configured() else "offline"
        self.run = wandb.init(project=train.wandb_project, dir=str(out_dir), id=run_id,
                              resume="allow", mode=mode, name=out_dir.name,
                              settings=wandb.Settings(silent=True))
        self.wandb = wandb

    def write(self, record: dict) -> None:
        values = {k: v for k, v in record.items() if k != "step" and v is not None}
        self.run.log(values, step=record["step"])

    def write_text(self, step: int, tag: str, text: str) -> None:
        self.run.log({tag: self.wandb.Html(f"<pre>{html.escape(text)}</pre>")}, step=step)

    def close(self) -> None:
        self.run.finish()


def _wandb_key_configured() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def keep_rows_up_to(path: Path, step: int) -> None:
    """Rewrite a JSONL metrics file without its rows past ``step`` (atomically: a crash
    leaves the old file or the new one). A line that is not JSON (a run killed mid-write)
    is dropped too."""
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and row.get("step", 0) <= step:
            kept.append(line + "\n")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)


# (is it on for this run, how to make it from the run folder, the train config and the
# step the run starts at). Writers are made by process 0 only.
WriterFactory = Callable[[Path, TrainConfig, int], Writer]
WRITERS: list[tuple[Callable[[TrainConfig], bool], WriterFactory]] = [
    (lambda train: True, JsonlWriter),
    (lambda train: train.tensorboard, TensorBoardWriter),
    (lambda train: bool(train.wandb_project), WandbWriter),
]


def make_writers(out_dir: Path, train: TrainConfig, start_step: int) -> list[Writer]:
    if jax.process_index() != 0:
        return []
    return [make(out_dir, train, start_step) for enabled, make in WRITERS if enabled(train)]


class PhaseTimes:
    """Wall time per phase of a run (set-up, compile, steps, evaluation, ...), printed as
    one line at the end, so fixed costs are visible next to the training itself. A phase
    inside another (an evaluation inside the steps) is not counted twice."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._inner: list[float] = []  # time spent in nested phases, per open phase

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        began = time.perf_counter()
        self._inner.append(0.0)
        try:
            yield
        finally:
            spent = time.perf_counter() - began
            self.seconds[name] = self.seconds.get(name, 0.0) + spent - self._inner.pop()
            if self._inner:
                self._inner[-1] += spent

    def line(self) -> str:
        total = sum(self.seconds.values())
        parts = ", ".join(f"{k} {v:.1f} s" for k, v in self.seconds.items())
        return f"time: {parts}; total {total:.1f} s"


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


class Display:
    """What the person watching sees per step: a live bar on a terminal, plain lines
    every ``log_interval`` steps otherwise (a file under nohup or SLURM gets no carriage
    returns), nothing with ``train.progress=false``. Started after the first step, so
    compilation never counts towards the rate or the ETA."""

    def __init__(self, train: TrainConfig) -> None:
        self.train = train
        shown = train.progress and jax.process_index() == 0
        self.mode = ("bar" if sys.stdout.isatty() else "lines") if shown else "off"
        self.bar: tqdm | None = None
        self.started_at = time.perf_counter()

    def start(self, step: int) -> None:
        self.started_at = time.perf_counter()
        if self.mode == "bar":
            self.bar = tqdm(total=self.train.max_steps, initial=step, dynamic_ncols=True,
                            file=sys.stdout)

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def show(self, record: dict) -> None:
        mfu = record.get("mfu")
        if self.bar is not None:
            extra = {"mfu": f"{mfu:.1%}"} if mfu is not None else {}
            self.bar.set_postfix(loss=f"{record['train_loss']:.4f}", lr=f"{record['lr']:.2e}",
                                 tok_s=f"{record['tokens_per_sec']:,.0f}", **extra)
        elif self.mode == "lines":
            elapsed = int(time.perf_counter() - self.started_at)
            print(f"step {record['step']}/{self.train.max_steps}  loss {record['train_loss']:.4f}"
                  f"  lr {record['lr']:.2e}  grad_norm {record['grad_norm']:.3f}  tok/s "
                  f"{record['tokens_per_sec']:,.0f}" + (f"  mfu {mfu:.1%}" if mfu else "")
                  + f"  elapsed {elapsed // 3600}:{elapsed // 60 % 60:02d}:{elapsed % 60:02d}",
                  flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class Reporter:
    """Reads step metrics, keeps the throughput window and the display, and writes a
    record every ``train.log_interval`` steps (and whenever a read is ``force``d before
    an evaluation, a save or the end) to every writer.

    ``flops_per_token`` and ``peak_flops`` (per second, all devices; None when unknown)
    add model FLOPs utilisation to the records.
    """

    def __init__(self, train: TrainConfig, out_dir: Path, start_step: int,
                 flops_per_token: float = 0.0, peak_flops: float | None = None) -> None:
        self.train = train
        self.out_dir = out_dir
        self.writers = make_writers(out_dir, train, start_step)
        self.summary: dict = {"start_step": start_step}  # what ``Trainer.run`` returns
        self.throughput = ThroughputWindow()
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self.display = Display(train)
        self.plot_refused = False

    def compiled(self, step: int, seconds: float) -> None:
        """The train step is compiled: from here on time and show the steps."""
        say(f"compiled in {seconds:.1f} s")
        self.throughput.restart()
        self.display.start(step)

    def step_done(self) -> None:
        self.display.advance()

    def read_step(self, step: int, device_metrics: dict, force: bool = False) -> dict:
        """Fetch a finished step's metrics to the host, report skipped updates, log on
        the interval; returns the host metrics."""
        m = jax.device_get(device_metrics)
        if not force:
            self.throughput.add(float(m["tokens"]))
        self.summary["train_loss"] = float(m["loss"])
        self.summary.setdefault("first_loss", float(m["loss"]))
        if bool(m.get("overflow", False)):
            say(f"step {step}: float16 gradient overflow, update skipped; loss scale now "
                f"{float(m['loss_scale']):g}")
            self.summary.setdefault("overflow_steps", []).append(step)
        elif not bool(m["applied"]):
            say(f"step {step}: non-finite gradient, update skipped "
                f"({int(m['nonfinite_streak'])} in a row)")
            self.summary.setdefault("skipped_steps", []).append(step)
        if force or step % self.train.log_interval == 0:
            self._log(step, m, float(m["tokens"]) if force else 0.0)
        return m

    def _log(self, step: int, m: dict, forced_tokens: float) -> None:
        rate = self.throughput.rate(forced_tokens)
        record = {"step": step, "train_loss": float(m["loss"]), "lr": float(m["lr"]),
                  "grad_norm": float(m["grad_norm"]), "tokens_per_sec": rate}
        if self.peak_flops:
            record["mfu"] = rate * self.flops_per_token / self.peak_flops
        if "loss_scale" in m:
            record["loss_scale"] = float(m["loss_scale"])
        self.write(record)
        self.display.show(record)
        self.throughput.restart()

    def write(self, record: dict) -> None:
        for writer in self.writers:
            writer.write(record)

    def evaluated(self, step: int, results: dict[str, float]) -> None:
        """An evaluation's named metrics: written, and shown as one line."""
        self.summary.update(results)
        self.write({"step": step, **results})
        say(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in results.items()))

    def sampled(self, step: int, samples: list[str]) -> None:
        """Text sampled at an evaluation: appended to ``samples.txt`` and every writer."""
        if jax.process_index() != 0:
            return
        with open(self.out_dir / "samples.txt", "a") as file:
            for i, text in enumerate(samples):
                file.write(f"=== step {step}, sample {i} ===\n{text}\n")
        for writer in self.writers:
            writer.write_text(step, "samples", "\n\n".join(samples))

    def redraw_plot(self) -> None:
        """``loss.png`` of this run (``train.plot``), if matplotlib is installed."""
        if not self.train.plot or jax.process_index() != 0:
            return
        try:
            plot_runs([self.out_dir], self.out_dir / "loss.png")
        except InputError as err:  # matplotlib is an optional extra: say so once
            if not self.plot_refused:
                say(f"loss.png not drawn: {err}")
            self.plot_refused = True

    def close(self) -> None:
        self.display.close()
        for writer in self.writers:
            writer.close()
