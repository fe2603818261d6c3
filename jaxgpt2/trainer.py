"""The training loop: wire config, data, model, optimizer, step and checkpoints together.

Order of work, so that bad input never costs a finished step or an existing file: the
config is validated, the data opened and checked, the resume decided and checked for
compatibility (``jaxgpt2.resume``) and the output folder tested for writing, all before
the first step is compiled. What is reported goes through ``jaxgpt2.metrics``; what is
evaluated comes from ``jaxgpt2.evaluation``'s registry.
"""

from __future__ import annotations

import dataclasses
import signal
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import jax
import numpy as np
import yaml

from jaxgpt2 import sharding
from jaxgpt2.checkpoint import Checkpointer
from jaxgpt2.config import Config, GPTConfig, resolve_auto
from jaxgpt2.data import STREAMS, BatchSource, Dataset, Prefetcher, open_dataset, resolve_dataset_dir
from jaxgpt2.errors import ConfigError, InputError, NonFiniteError, UserError
from jaxgpt2.evaluation import EvalContext, make_evaluations
from jaxgpt2.generate import generate
from jaxgpt2.hf import load_pretrained
from jaxgpt2.metrics import Reporter, make_writers, say
from jaxgpt2.model import GPT, count_params
from jaxgpt2.optim import build_optimizer
from jaxgpt2.resume import (SUPERSEDED, changed_fields, check_compatible, choose_resume_step,
                            restore_state, saved_model_config)
from jaxgpt2.step import TrainState, create_train_state, make_train_step
from jaxgpt2.tokenizer import encode_prompt


def resolve_model_config(config: Config, dataset: Dataset, platform: str,
                         pretrained: GPTConfig | None = None) -> GPTConfig:
    """The model's config with ``null``/``auto`` values decided by the data and devices.

    With ``model.init_from``, the architecture comes from the pretrained model; the
    block size may only shrink (position embeddings are cropped, as nanoGPT does).
    """
    gpt = config.model.gpt_config()
    vocab_size = config.model.vocab_size
    if pretrained is not None:
        if gpt.block_size > pretrained.block_size:
            raise ConfigError(f"model.block_size={gpt.block_size} exceeds the pretrained "
                              f"model's {pretrained.block_size} positions")
        gpt = dataclasses.replace(gpt, vocab_size=pretrained.vocab_size, n_layer=pretrained.n_layer,
                                  n_head=pretrained.n_head, n_embd=pretrained.n_embd, bias=True)
        vocab_size = pretrained.vocab_size
    if vocab_size is None:
        gpt = dataclasses.replace(gpt, vocab_size=dataset.vocab_size)
    elif vocab_size < dataset.vocab_size:
        raise ConfigError(f"model.vocab_size={vocab_size} is smaller than the dataset's "
                          f"vocabulary ({dataset.vocab_size}, from {dataset.path}/meta.json); "
                          "set model.vocab_size to null to take it from the data")
    gpt = resolve_auto(gpt, platform)
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


class Trainer:
    """Owns the run's state; ``run()`` trains to ``train.max_steps`` and returns a summary."""

    def __init__(self, config: Config) -> None:
        self.config = config
        tc = config.train
        sharding.maybe_initialize_distributed()
        self.devices = sharding.select_devices(tc.device)
        self.mesh = sharding.make_mesh(config.mesh, self.devices)
        sharding.check_batch_divides(config.data.batch_size, self.mesh)
        self.dataset = open_dataset(resolve_dataset_dir(config.data.dataset, config.data.cache_dir),
                                    min_tokens=config.model.block_size + 1)
        self._check_sample_prompt()
        self.out_dir = Path(tc.out_dir)
        self.resume_step = choose_resume_step(tc, self.out_dir)
        pretrained_config, pretrained_params = self._pretrained()
        self.gpt_config = resolve_model_config(config, self.dataset, self.devices[0].platform,
                                               pretrained_config)
        self.model = GPT(self.gpt_config)
        check_writable(self.out_dir)
        self.resolved = config.to_dict()
        self.resolved["model"].update(dataclasses.asdict(self.gpt_config))
        self.resolved["data"]["tokenizer"] = self.dataset.meta["tokenizer"]
        self.optimizer = build_optimizer(config.optim, tc.max_steps)
        self.checkpointer = Checkpointer(self.out_dir / "checkpoints", keep=tc.keep,
                                         best_metric=tc.best_metric,
                                         best_direction=tc.best_direction)
        self._build_state(pretrained_params)
        self._build_step()

    # -- set-up -------------------------------------------------------------------------
    def _check_sample_prompt(self) -> None:
        """Found now, not after the training the sample would follow."""
        if self.config.train.sample_tokens:
            try:
                encode_prompt(self.dataset.tokenizer(), self.config.train.sample_prompt)
            except InputError as err:
                raise ConfigError(f"train.sample_prompt={self.config.train.sample_prompt!r}: "
                                  f"{err}") from None

    def _pretrained(self) -> tuple[GPTConfig | None, dict | None]:
        """``model.init_from``'s architecture and weights; resuming a fine-tune needs only
        the architecture, which its checkpoint records."""
        init_from = self.config.model.init_from
        if not init_from:
            return None, None
        if self.resume_step is not None:
            return saved_model_config(self.out_dir, self.resume_step), None
        try:
            return load_pretrained(init_from)
        except UserError as err:
            raise ConfigError(f"model.init_from={init_from!r}: {err}") from None

    def _build_state(self, pretrained_params: dict | None) -> None:
        seed = self.config.train.seed
        loss_scale = self.config.optim.loss_scale if self.gpt_config.dtype == "float16" else None
        fresh = lambda params: create_train_state(params, self.optimizer, seed, loss_scale)
        abstract = jax.eval_shape(lambda: fresh(self.model.init_params(jax.random.PRNGKey(seed))))
        self.state_sharding = self._state_sharding(abstract)
        if self.resume_step is not None:
            self.state = self._restore(self.resume_step, abstract, loss_scale)
        elif pretrained_params is None:
            init = lambda: fresh(self.model.init_params(jax.random.PRNGKey(seed)))
            self.state = jax.jit(init, out_shardings=self.state_sharding)()
        else:
            # Weights enter as an argument, never as constants baked into the program;
            # position embeddings are cropped to block_size.
            params = dict(pretrained_params)
            params["wpe"] = {"embedding": params["wpe"]["embedding"][: self.gpt_config.block_size]}
            params = jax.device_put(params, self.state_sharding.params)
            self.state = jax.jit(fresh, out_shardings=self.state_sharding, donate_argnums=0)(params)

    def _state_sharding(self, abstract: TrainState) -> TrainState:
        shardings = sharding.state_shardings(abstract, self.mesh)
        return shardings.replace(step=self._replicated(), rng=self._replicated())

    def _restore(self, step: int, abstract: TrainState, loss_scale: float | None) -> TrainState:
        saved = self.checkpointer.read_meta(step)["config"]
        check_compatible(saved, self.resolved)
        state = restore_state(self.checkpointer, step, abstract, self._state_sharding,
                              loss_scale, self._replicated())
        for change in changed_fields(saved, self.resolved):
            say(f"resume: {change}")
        say(f"resumed from {self.checkpointer.directory / str(step)}")
        set_aside = self.checkpointer.set_aside_after(step, self.out_dir / SUPERSEDED)
        if set_aside:
            say(f"checkpoints after step {step} (steps {', '.join(map(str, set_aside))}) moved "
                f"to {self.out_dir / SUPERSEDED}, so this run can save those steps again")
        return state

    def _replicated(self) -> jax.sharding.NamedSharding:
        return jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())

    def _build_step(self) -> None:
        """The jitted train step, its batches, and the evaluations it is scored by."""
        tc, dc = self.config.train, self.config.data
        self.batch_sharding = sharding.batch_sharding(self.mesh)
        step_fn = make_train_step(self.model, self.optimizer, tc.debug_nan_steps,
                                  self.config.optim.loss_scale_interval)
        self.train_step = jax.jit(step_fn, in_shardings=(self.state_sharding, self.batch_sharding),
                                  out_shardings=(self.state_sharding, self._replicated()),
                                  donate_argnums=0)
        rows = sharding.process_rows(dc.batch_size)
        self.train_source = BatchSource(self.dataset.train, dc.mode, dc.batch_size,
                                        self.gpt_config.block_size, tc.grad_accum, tc.seed,
                                        STREAMS["train"], *rows)
        self.evaluations = make_evaluations(EvalContext(
            self.config, self.model, self.dataset, rows, self._place, self.state_sharding.params,
            self.batch_sharding, self._replicated()))
        produced = [m for e in self.evaluations for m in e.metrics]
        if produced and tc.best_metric not in produced:
            raise ConfigError(f"train.best_metric={tc.best_metric!r} is not a metric this run "
                              f"evaluates ({', '.join(produced)})")

    def _place(self, batch: dict) -> dict:
        return sharding.place_batch(batch, self.batch_sharding, self.config.data.batch_size)

    # -- the loop -----------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        """Every configured evaluation of the current parameters, by metric name."""
        results: dict[str, float] = {}
        for evaluation in self.evaluations:
            results.update(evaluation(self.state.params))
        return results

    def save(self, metrics: dict[str, float] | None = None) -> None:
        meta = {"config": self.resolved,
                "data": {"seed": self.config.train.seed,
                         "next_step": int(jax.device_get(self.state.step))},
                "tokenizer": {k: v for k, v in self.dataset.meta.items()
                              if k in ("tokenizer", "vocab_size", "chars", "eot_id")}}
        self.checkpointer.save(self.state, meta, metrics)

    def _describe(self) -> None:
        tc, dc = self.config.train, self.config.data
        n_dev, device = len(self.devices), self.devices[0]
        cfg = self.gpt_config
        say(f"devices: {n_dev} x {device.device_kind} ({device.platform}); "
            f"mesh {dict(self.mesh.shape)}; processes: {jax.process_count()}")
        say(f"model: {count_params(self.state.params) / 1e6:.2f}M parameters, {cfg.n_layer} "
            f"layers, {cfg.n_embd} wide, compute {cfg.dtype}, attention {cfg.attention}, "
            f"remat {cfg.remat}; optimizer {self.config.optim.name}, schedule "
            f"{self.config.optim.schedule}")
        say(f"batch: global {dc.batch_size * tc.grad_accum} = micro-batch {dc.batch_size // n_dev}"
            f" per device x {n_dev} devices x {tc.grad_accum} accumulation; "
            f"{dc.batch_size * tc.grad_accum * cfg.block_size:,} tokens/step")

    def run(self) -> dict:
        """Train from the current step to ``train.max_steps``; returns a summary."""
        (self.out_dir / "config.yaml").write_text(yaml.safe_dump(self.resolved, sort_keys=False))
        self._describe()
        start = int(jax.device_get(self.state.step))
        reporter = Reporter(self.config.train, make_writers(self.out_dir, self.config.train), start)
        prefetch = Prefetcher(self.train_source, self._place, start, self.config.data.prefetch)
        summary: dict = {"start_step": start}
        try:
            with stop_on_signals() as stop:
                self._loop(start, prefetch, reporter, summary, stop)
        except NonFiniteError as err:
            # Skipped steps leave the weights as the last good step made them, so the
            # state is worth keeping: a resume continues after the bad batches.
            self.save()
            raise NonFiniteError(f"{err}; saved step {int(jax.device_get(self.state.step))} "
                                 "(its weights are the last finite update's)") from None
        finally:
            prefetch.close()
            reporter.close()
            self.checkpointer.wait()
        summary["step"] = int(jax.device_get(self.state.step))
        return summary

    def _loop(self, step: int, prefetch: Prefetcher, reporter: Reporter, summary: dict,
              stop: dict) -> None:
        """Steps until ``max_steps`` or a signal; each step's metrics are read one step
        late, after the next step is dispatched, unless an eval or save needs them now."""
        tc = self.config.train
        pending = None  # (step, device metrics) of the previous step
        while step < tc.max_steps:
            _, batch = prefetch.next()
            self.state, metrics = self.train_step(self.state, batch)
            step += 1
            if pending is not None:
                self._read(reporter, *pending, summary)
            pending = (step, metrics)
            reporter.step_done()
            must_eval = step % tc.eval_interval == 0 or step == tc.max_steps
            must_save = step % tc.save_interval == 0 or step == tc.max_steps
            if must_eval or must_save or stop["signal"]:
                self._read(reporter, *pending, summary, force=True)
                pending = None
            results = self.evaluate() if must_eval else {}
            if results:
                reporter.evaluated(step, results)
                summary.update(results)
            if must_save or stop["signal"]:
                self.save(results)
            if must_eval or must_save:
                reporter.throughput.restart()  # exclude eval/save time
            if stop["signal"]:
                say(f"{stop['signal']}: saved step {step}; resume with: python train.py "
                    f"--config <same config> train.out_dir={self.out_dir} train.resume=true")
                summary["stopped_by"] = stop["signal"]
                return
        if pending is not None:
            self._read(reporter, *pending, summary, force=True)

    def _read(self, reporter: Reporter, step: int, device_metrics: dict, summary: dict,
              force: bool = False) -> None:
        """Report a finished step and stop at ``optim.max_consecutive_nonfinite``."""
        m = reporter.read_step(step, device_metrics, force)
        summary["train_loss"] = float(m["loss"])
        summary.setdefault("first_loss", float(m["loss"]))
        if bool(m.get("overflow", False)):
            summary.setdefault("overflow_steps", []).append(step)
        elif not bool(m["applied"]):
            summary.setdefault("skipped_steps", []).append(step)
            limit = self.config.optim.max_consecutive_nonfinite
            if int(m["nonfinite_streak"]) >= limit:
                raise NonFiniteError(
                    f"{limit} consecutive steps had non-finite gradients (last: step {step}); "
                    "stopping. Lower optim.lr or check the data, then resume with "
                    "train.resume=true")

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
