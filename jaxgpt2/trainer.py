"""The training loop: wire config, data, model, optimizer, step and checkpoints together.

Order of work, so that bad input never costs a finished step or an existing file: the
config is validated, the data opened and checked, the output folder tested for writing
and a resume checked for compatibility, all before the first step is compiled.
Metrics are fetched one step late, so the host never stalls the device to log.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import jax
import numpy as np
import yaml
from tqdm import tqdm

from jaxgpt2.checkpoint import Checkpointer
from jaxgpt2.config import Config, ConfigError, GPTConfig
from jaxgpt2.data import (STREAMS, BatchSource, Dataset, Prefetcher, mean_loss, open_dataset,
                          resolve_dataset_dir)
from jaxgpt2.generate import generate
from jaxgpt2.hf import load_pretrained
from jaxgpt2.model import GPT, count_params
from jaxgpt2.optim import learning_rate_schedule, make_optimizer
from jaxgpt2 import sharding
from jaxgpt2.loss_scale import LossScale
from jaxgpt2.step import TrainState, create_train_state, make_eval_step, make_train_step
from jaxgpt2.tokenizer import encode_prompt

# Fields that define what a checkpoint *is*; changing them on resume is an error.
# Everything else (steps, cadence, schedule length, batch size) may change and is logged.
INCOMPATIBLE_ON_RESUME = ("model.vocab_size", "model.block_size", "model.n_layer",
                          "model.n_head", "model.n_embd", "model.bias", "data.tokenizer")


# Where checkpoints after a resumed step are moved (kept, never deleted): a run resumed
# from an earlier step saves those step numbers again.
SUPERSEDED = "superseded_checkpoints"


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with non-finite gradients."""


def resolve_model_config(config: Config, dataset: Dataset, platform: str,
                         pretrained: GPTConfig | None = None) -> GPTConfig:
    """The model's config with ``null``/``auto`` values decided by the data and devices.

    With ``model.init_from``, the architecture comes from the pretrained model; the
    block size may only shrink (position embeddings are cropped, as nanoGPT does).
    """
    gpt = config.model.gpt_config()
    if pretrained is not None:
        if gpt.block_size > pretrained.block_size:
            raise ConfigError(f"model.block_size={gpt.block_size} exceeds the pretrained "
                              f"model's {pretrained.block_size} positions")
        gpt = dataclasses.replace(gpt, vocab_size=pretrained.vocab_size, n_layer=pretrained.n_layer,
                                  n_head=pretrained.n_head, n_embd=pretrained.n_embd, bias=True)
        config = dataclasses.replace(config, model=dataclasses.replace(
            config.model, vocab_size=pretrained.vocab_size))
    vocab = dataset.vocab_size
    if config.model.vocab_size is None:
        gpt = dataclasses.replace(gpt, vocab_size=vocab)
    elif config.model.vocab_size < vocab:
        raise ConfigError(f"model.vocab_size={config.model.vocab_size} is smaller than the "
                          f"dataset's vocabulary ({vocab}, from {dataset.path}/meta.json); "
                          "set model.vocab_size to null to take it from the data")
    if gpt.dtype == "auto":
        gpt = dataclasses.replace(gpt, dtype="bfloat16" if platform in ("gpu", "tpu") else "float32")
    if gpt.attention == "auto":
        sixteen_bit = gpt.dtype in ("bfloat16", "float16")
        gpt = dataclasses.replace(gpt, attention="cudnn" if platform == "gpu" and sixteen_bit else "xla")
    gpt.validate()
    return gpt


def check_writable(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".write_test.{jax.process_index()}"  # processes may share out_dir
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"train.out_dir={str(out_dir)!r} is not writable ({err.strerror}); "
                          "choose another folder with train.out_dir=...") from None


@contextmanager
def stop_on_signals() -> Iterator[dict]:
    """SIGINT/SIGTERM set a flag instead of killing the process, so the loop can finish
    the current step and write a checkpoint (a cluster's preemption, a Ctrl-C)."""
    flag = {"signal": None}
    handler = lambda signum, _frame: flag.update(signal=signal.Signals(signum).name)
    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


class ThroughputWindow:
    """Tokens per second between log lines, timed when step results are read.

    The loop reads a step's results right after dispatching the next step. Under gradient
    accumulation XLA:GPU runs the accumulation loop with the host waiting, so that read
    lands partway into the next step; it always does, so the time between two such
    reads is whole steps. A read forced before an eval, a save or the end has no next
    step behind it and lands at the end of its own step, so a window closed by it is
    timed up to the last ordinary read (on an H100 the recipe's last window otherwise
    read 25% high).
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


class MetricsLog:
    """``metrics.jsonl`` (one JSON object per line), written by process 0 only."""

    def __init__(self, path: Path) -> None:
        self.file = open(path, "a") if jax.process_index() == 0 else None

    def write(self, record: dict) -> None:
        """One line; a non-finite number is written as ``null``, since bare ``NaN`` is not
        JSON and strict readers (JavaScript, Go, serde) reject the whole file."""
        if self.file:
            record = {k: None if isinstance(v, float) and not math.isfinite(v) else v
                      for k, v in record.items()}
            self.file.write(json.dumps(record, allow_nan=False) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file:
            self.file.close()


def say(message: str) -> None:
    if jax.process_index() == 0:
        tqdm.write(message)


def differing_fields(saved: dict, current: dict) -> list[str]:
    diffs = []
    for dotted in INCOMPATIBLE_ON_RESUME:
        section, key = dotted.split(".")
        a, b = saved.get(section, {}).get(key), current.get(section, {}).get(key)
        if a != b:
            diffs.append(f"{dotted}: checkpoint {a!r}, now {b!r}")
    return diffs


class Trainer:
    """Owns the run's state; ``run()`` trains to ``train.max_steps`` and returns a summary."""

    def __init__(self, config: Config) -> None:
        self.config = config
        tc = config.train
        sharding.maybe_initialize_distributed()
        self.devices = sharding.select_devices(tc.device)
        self.mesh = sharding.make_mesh(config.mesh, self.devices)
        sharding.check_batch_divides(config.data.batch_size, self.mesh)

        data_dir = resolve_dataset_dir(config.data.dataset, config.data.cache_dir)
        block = config.model.block_size
        self.dataset = open_dataset(data_dir, min_tokens=block + 1)
        if tc.sample_tokens:  # found now, not after the training it would follow
            try:
                encode_prompt(self.dataset.tokenizer(), tc.sample_prompt)
            except ValueError as err:
                raise ConfigError(f"train.sample_prompt={tc.sample_prompt!r}: {err}") from None
        self.out_dir = Path(tc.out_dir)
        self.resume_step = self._resume_step()
        self.pretrained = None
        pretrained_config = None
        if config.model.init_from and self.resume_step is None:
            self.pretrained = self._load_init_from()
            pretrained_config = self.pretrained[0]
        elif config.model.init_from:  # resuming a fine-tune: the checkpoint holds the weights
            pretrained_config = self._saved_model_config(self.resume_step)
        self.gpt_config = resolve_model_config(config, self.dataset, self.devices[0].platform,
                                               pretrained_config)
        self.model = GPT(self.gpt_config)

        check_writable(self.out_dir)
        self.resolved = config.to_dict()
        self.resolved["model"].update(dataclasses.asdict(self.gpt_config))
        self.resolved["data"]["tokenizer"] = self.dataset.meta["tokenizer"]

        self.schedule = learning_rate_schedule(config.optim, tc.max_steps)
        self.optimizer = make_optimizer(config.optim, tc.max_steps)
        self.checkpointer = Checkpointer(self.out_dir / "checkpoints", keep=tc.keep)
        self._build_state()
        self._compile()

    # -- set-up -------------------------------------------------------------------------
    def _build_state(self) -> None:
        tc = self.config.train
        initial_scale = self._initial_loss_scale()
        scratch = lambda: create_train_state(
            self.model.init_params(jax.random.PRNGKey(tc.seed)), self.optimizer, tc.seed,
            initial_scale)
        abstract = jax.eval_shape(scratch)
        self.state_sharding = self._state_sharding(abstract)
        if self.resume_step is not None:
            self._restore(self.resume_step, abstract)
        elif self.pretrained is None:
            self.state = jax.jit(scratch, out_shardings=self.state_sharding)()
        else:
            # Weights enter as an argument, never as constants baked into the program.
            params = jax.device_put(self._pretrained_params(), self.state_sharding.params)
            self.state = jax.jit(
                lambda p: create_train_state(p, self.optimizer, tc.seed, initial_scale),
                out_shardings=self.state_sharding, donate_argnums=0)(params)

    def _initial_loss_scale(self) -> float | None:
        """float16 runs scale their loss (``jaxgpt2.loss_scale``); others do not."""
        return self.config.optim.loss_scale if self.gpt_config.dtype == "float16" else None

    def _state_sharding(self, abstract: TrainState) -> TrainState:
        shardings = sharding.state_shardings(abstract, self.mesh)
        return shardings.replace(step=self._replicated(), rng=self._replicated())

    def _restore(self, step: int, abstract: TrainState) -> None:
        meta = self.checkpointer.read_meta(step)
        diffs = differing_fields(meta["config"], self.resolved)
        if diffs:
            raise ConfigError("cannot resume: the checkpoint was made with a different setup: "
                              + "; ".join(diffs))
        # Restore the tree the checkpoint holds, then add or drop the loss scale when the
        # run moves into or out of float16.
        saved_scaled = meta["config"].get("model", {}).get("dtype") == "float16"
        target = abstract.replace(loss_scale=jax.eval_shape(lambda: LossScale.create(1.0))
                                  if saved_scaled else None)
        self.state, _ = self.checkpointer.restore(step, target, self._state_sharding(target))
        initial_scale = self._initial_loss_scale()
        if saved_scaled and initial_scale is None:
            self.state = self.state.replace(loss_scale=None)
        elif initial_scale is not None and not saved_scaled:
            self.state = self.state.replace(loss_scale=jax.device_put(
                LossScale.create(initial_scale), self._replicated()))
        self._log_resume_changes(meta["config"])
        say(f"resumed from {self.checkpointer.directory / str(step)}")
        set_aside = self.checkpointer.set_aside_after(step, self.out_dir / SUPERSEDED)
        if set_aside:
            say(f"checkpoints after step {step} (steps {', '.join(map(str, set_aside))}) moved "
                f"to {self.out_dir / SUPERSEDED}, so this run can save those steps again")

    def _pretrained_params(self) -> dict:
        """The ``model.init_from`` weights, position embeddings cropped to ``block_size``."""
        params = dict(self.pretrained[1])
        params["wpe"] = {"embedding": params["wpe"]["embedding"][: self.gpt_config.block_size]}
        return params

    def _resume_step(self) -> int | None:
        """The step to restore, if any, decided before anything is written. Asking to
        resume a folder without checkpoints is an error (a mistyped folder would
        otherwise train from scratch), and a fresh run refuses a folder that holds
        another run's checkpoints: its saves would collide with theirs, or its retention
        would delete them."""
        tc = self.config.train
        existing = self._existing_steps()
        if tc.resume_step is not None:
            if tc.resume_step not in existing:
                raise ConfigError(f"train.resume_step={tc.resume_step}: {self.out_dir} has no "
                                  f"checkpoint for that step (it has: "
                                  f"{', '.join(map(str, existing)) or 'none'})")
            return tc.resume_step
        if tc.resume:
            if not existing:
                raise ConfigError(f"train.resume=true, but {self.out_dir} holds no checkpoints; "
                                  "check train.out_dir (or --resume RUN_DIR), or drop "
                                  "train.resume to start a new run there")
            return existing[-1]
        if existing:
            raise ConfigError(f"{self.out_dir} already holds checkpoints of a run (steps "
                              f"{', '.join(map(str, existing))}); continue it with "
                              "train.resume=true, or start over in another train.out_dir")
        return None

    def _existing_steps(self) -> list[int]:
        """Finished checkpoints in ``out_dir``, read without creating or cleaning anything."""
        directory = self.out_dir / "checkpoints"
        if not directory.is_dir():
            return []
        reader = Checkpointer(directory, read_only=True)
        try:
            return reader.steps()
        finally:
            reader.close()

    def _saved_model_config(self, step: int) -> GPTConfig:
        """The architecture a checkpoint was trained with (for resuming a fine-tune
        without the ``model.init_from`` folder it started from)."""
        reader = Checkpointer(self.out_dir / "checkpoints", read_only=True)
        try:
            return reader.read_model_config(step)
        finally:
            reader.close()

    def _load_init_from(self) -> tuple[GPTConfig, dict]:
        init_from = self.config.model.init_from
        try:
            return load_pretrained(init_from)
        except (ValueError, FileNotFoundError) as err:
            raise ConfigError(f"model.init_from={init_from!r}: {err}") from None

    def _log_resume_changes(self, saved: dict) -> None:
        for section, values in self.resolved.items():
            if not isinstance(values, dict):
                continue
            for key, value in values.items():
                old = saved.get(section, {}).get(key)
                if old != value and key not in ("resume", "resume_step"):
                    say(f"resume: {section}.{key} changed from {old!r} to {value!r}")

    def _replicated(self):
        return jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())

    def _compile(self) -> None:
        tc, dc = self.config.train, self.config.data
        self.batch_sharding = sharding.batch_sharding(self.mesh)
        step_fn = make_train_step(self.model, self.optimizer, self.schedule, tc.debug_nan_steps,
                                  self.config.optim.loss_scale_interval)
        self.train_step = jax.jit(step_fn, in_shardings=(self.state_sharding, self.batch_sharding),
                                  out_shardings=(self.state_sharding, self._replicated()),
                                  donate_argnums=0)
        self.eval_step = jax.jit(make_eval_step(self.model),
                                 in_shardings=(self.state_sharding.params, self.batch_sharding),
                                 out_shardings=self._replicated())
        rows = sharding.process_rows(dc.batch_size)
        block = self.gpt_config.block_size
        self.train_source = BatchSource(self.dataset.train, dc.mode, dc.batch_size, block,
                                        tc.grad_accum, tc.seed, STREAMS["train"], *rows)
        self.val_source = BatchSource(self.dataset.val, dc.mode, dc.batch_size, block,
                                      1, tc.seed, STREAMS["val"], *rows)

    def _place(self, batch: dict) -> dict:
        return sharding.place_batch(batch, self.batch_sharding, self.config.data.batch_size)

    # -- the loop -----------------------------------------------------------------------
    def evaluate(self) -> float:
        """Mean loss over ``train.eval_steps`` fixed validation batches (the same ones at
        every evaluation, so successive values are comparable)."""
        return mean_loss(self.eval_step, self.state.params, self.val_source,
                         self.config.train.eval_steps, self._place)[0]

    def _checkpoint_meta(self) -> dict:
        return {"config": self.resolved, "data": {"seed": self.config.train.seed,
                                                  "next_step": int(jax.device_get(self.state.step))},
                "tokenizer": {k: v for k, v in self.dataset.meta.items()
                              if k in ("tokenizer", "vocab_size", "chars", "eot_id")}}

    def save(self, val_loss: float | None = None) -> None:
        self.checkpointer.save(self.state, self._checkpoint_meta(), val_loss)

    def _describe(self) -> None:
        tc, dc = self.config.train, self.config.data
        n_dev = len(self.devices)
        tokens = dc.batch_size * tc.grad_accum * self.gpt_config.block_size
        say(f"devices: {n_dev} x {self.devices[0].device_kind} ({self.devices[0].platform}); "
            f"mesh {dict(self.mesh.shape)}; processes: {jax.process_count()}")
        say(f"model: {count_params(self.state.params) / 1e6:.2f}M parameters, "
            f"{self.gpt_config.n_layer} layers, {self.gpt_config.n_embd} wide, compute "
            f"{self.gpt_config.dtype}, attention {self.gpt_config.attention}, remat "
            f"{self.gpt_config.remat}")
        say(f"batch: global {dc.batch_size * tc.grad_accum} = micro-batch {dc.batch_size // n_dev}"
            f" per device x {n_dev} devices x {tc.grad_accum} accumulation; {tokens:,} tokens/step")

    def run(self) -> dict:
        tc = self.config.train
        (self.out_dir / "config.yaml").write_text(yaml.safe_dump(self.resolved, sort_keys=False))
        self._describe()
        start = int(jax.device_get(self.state.step))
        log = MetricsLog(self.out_dir / "metrics.jsonl")
        prefetch = Prefetcher(self.train_source, self._place, start, self.config.data.prefetch)
        bar = tqdm(total=tc.max_steps, initial=start, disable=not tc.progress
                   or jax.process_index() != 0, dynamic_ncols=True)
        summary: dict = {"start_step": start}
        pending = None  # (step, device metrics) of the previous step, read one step late
        self._throughput = ThroughputWindow()
        last_val = None
        try:
            with stop_on_signals() as stop:
                step = start
                while step < tc.max_steps:
                    _, batch = prefetch.next()
                    self.state, metrics = self.train_step(self.state, batch)
                    step += 1
                    if pending is not None:
                        self._report(*pending, log, bar, summary)
                    pending = (step, metrics)
                    bar.update(1)
                    must_eval = step % tc.eval_interval == 0 or step == tc.max_steps
                    must_save = step % tc.save_interval == 0 or step == tc.max_steps
                    if must_eval or must_save or stop["signal"]:
                        self._report(*pending, log, bar, summary, force=True)
                        pending = None
                    if must_eval and tc.eval_steps:
                        last_val = self.evaluate()
                        log.write({"step": step, "val_loss": last_val})
                        say(f"step {step}: val_loss {last_val:.4f}")
                        summary["val_loss"] = last_val
                    if must_save or stop["signal"]:
                        self.save(last_val if must_eval else None)
                    if must_eval or must_save:
                        self._throughput.restart()  # exclude eval/save time
                    if stop["signal"]:
                        say(f"{stop['signal']}: saved step {step}; resume with: python train.py "
                            f"--config <same config> train.out_dir={self.out_dir} train.resume=true")
                        summary["stopped_by"] = stop["signal"]
                        break
                if pending is not None:
                    self._report(*pending, log, bar, summary, force=True)
        except NonFiniteError as err:
            # Skipped steps leave the weights as the last good step made them, so the
            # state is worth keeping: a resume continues after the bad batches.
            self.save()
            raise NonFiniteError(f"{err}; saved step {int(jax.device_get(self.state.step))} "
                                 "(its weights are the last finite update's)") from None
        finally:
            prefetch.close()
            bar.close()
            log.close()
            self.checkpointer.wait()
        summary["step"] = int(jax.device_get(self.state.step))
        return summary

    def _report(self, step: int, device_metrics: dict, log: MetricsLog, bar, summary: dict,
                force: bool = False) -> None:
        """Read a finished step's metrics, enforce the non-finite limit, and log every
        ``log_interval`` steps (or when ``force``d before an eval or save)."""
        m = jax.device_get(device_metrics)
        if not force:
            self._throughput.add(float(m["tokens"]))
        summary["train_loss"] = float(m["loss"])
        summary.setdefault("first_loss", float(m["loss"]))
        if bool(m.get("overflow", False)):
            say(f"step {step}: float16 gradient overflow, update skipped; loss scale now "
                f"{float(m['loss_scale']):g}")
            summary["overflow_steps"] = summary.get("overflow_steps", []) + [step]
        elif not bool(m["applied"]):
            say(f"step {step}: non-finite gradient, update skipped "
                f"({int(m['nonfinite_streak'])} in a row)")
            summary["skipped_steps"] = summary.get("skipped_steps", []) + [step]
            limit = self.config.optim.max_consecutive_nonfinite
            if int(m["nonfinite_streak"]) >= limit:
                raise NonFiniteError(
                    f"{limit} consecutive steps had non-finite gradients (last: step {step}); "
                    "stopping. Lower optim.lr or check the data, then resume with "
                    "train.resume=true")
        if step % self.config.train.log_interval and not force:
            return
        rate = self._throughput.rate(float(m["tokens"]) if force else 0.0)
        record = {"step": step, "train_loss": float(m["loss"]), "lr": float(m["lr"]),
                  "grad_norm": float(m["grad_norm"]), "tokens_per_sec": rate}
        if "loss_scale" in m:
            record["loss_scale"] = float(m["loss_scale"])
        log.write(record)
        bar.set_postfix(loss=f"{record['train_loss']:.4f}", tok_s=f"{record['tokens_per_sec']:,.0f}")
        self._throughput.restart()

    def sample(self) -> str:
        """A short sample from the trained model (printed at the end of a run)."""
        tc = self.config.train
        tokenizer = self.dataset.tokenizer()
        prompt = encode_prompt(tokenizer, tc.sample_prompt)
        params = sharding.to_host(self.state.params)  # whole, even if split across hosts
        ids = generate(self.model, params, np.asarray([prompt]), tc.sample_tokens,
                       temperature=0.8, top_k=200, seed=tc.seed,
                       vocab_limit=tokenizer.vocab_size)
        return tokenizer.decode(ids[0].tolist())
