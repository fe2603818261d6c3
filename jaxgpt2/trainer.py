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
import time
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import jax
import numpy as np
import yaml

from jaxgpt2 import sharding
from jaxgpt2.ahead import CompileAhead
from jaxgpt2.auto_batch import (auto_batch_budget, choice_line, choose_agreed_micro_batch,
                                with_split)
from jaxgpt2.checkpoint import Checkpointer
from jaxgpt2.config import Config, GPTConfig, TrainConfig, resolve_auto
from jaxgpt2.data import STREAMS, BatchSource, Dataset, Prefetcher, open_dataset, resolve_dataset_dir
from jaxgpt2.errors import ConfigError, InputError, NonFiniteError, UserError
from jaxgpt2.evaluation import EvalContext, make_evaluations
from jaxgpt2.generate import compile_generate, generate
from jaxgpt2.hf import load_pretrained
from jaxgpt2.host_memory import keep_freed_memory
from jaxgpt2.metrics import PhaseTimes, Reporter, say
from jaxgpt2.model import GPT
from jaxgpt2.optim import build_optimizer
from jaxgpt2.run_lock import RunLock
from jaxgpt2.resume import (agreed_resume_step, check_compatible, choose_resume_step, resume,
                            saved_model_config)
from jaxgpt2.step import TrainState, create_train_state, jit_train_step, make_train_step
from jaxgpt2.summary import flops_per_token, memory_line, peak_flops, startup_lines
from jaxgpt2.tokenizer import Tokenizer, encode_prompt


# XLA options for a program that runs once: compiling fast beats running fast.
RUN_ONCE = {"xla_backend_optimization_level": 0}


def resolve_model_config(config: Config, dataset: Dataset, devices: Sequence[jax.Device],
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
    gpt = resolve_auto(gpt, devices[0].platform, len(devices))
    gpt.validate()
    if gpt.kernels == "pallas" and devices[0].platform != "gpu":
        raise ConfigError(f"model.kernels=pallas compiles Triton kernels for NVIDIA GPUs, and "
                          f"this run's devices are {devices[0].platform}; use model.kernels=auto")
    return gpt


def resolved_config(config: Config, gpt: GPTConfig, tokenizer: str) -> dict:
    """The config as the run uses it (model sizes and ``auto`` decided, the data's
    tokenizer named): what ``config.yaml`` and every checkpoint record."""
    resolved = config.to_dict()
    resolved["model"].update(dataclasses.asdict(gpt))
    resolved["data"]["tokenizer"] = tokenizer
    return resolved


def check_writable(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".write_test.{jax.process_index()}"  # processes may share out_dir
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"train.out_dir={str(out_dir)!r} is not writable ({err.strerror}); "
                          "choose another folder with train.out_dir=...") from None


def check_sample_prompt(tokenizer: Tokenizer, prompt: str) -> None:
    """Found before training, not after the training the sample would follow."""
    try:
        encode_prompt(tokenizer, prompt)
    except InputError as err:
        raise ConfigError(f"train.sample_prompt={prompt!r}: {err}") from None


def pretrained(init_from: str, out_dir: Path, resume_step: int | None
               ) -> tuple[GPTConfig | None, dict | None]:
    """``model.init_from``'s architecture and weights; resuming a fine-tune needs only
    the architecture, which its checkpoint records."""
    if not init_from:
        return None, None
    if resume_step is not None:
        return saved_model_config(out_dir, resume_step), None
    try:
        return load_pretrained(init_from)
    except UserError as err:
        raise ConfigError(f"model.init_from={init_from!r}: {err}") from None


def initial_state(model: GPT, fresh: Callable[[dict], TrainState], seed: int,
                  shardings: TrainState, pretrained_params: dict | None,
                  platform: str) -> TrainState:
    """A new run's state, made in its shardings: from the seed, or from ``model.init_from``'s
    weights (position embeddings cropped to ``block_size``), which enter the program as
    an argument, never as constants baked into it.

    On the CPU the seeded program is compiled without XLA's backend optimisations: it
    runs once, and its random draws for every parameter took 2.1 s to compile optimised
    against 0.6 s (the CPU recipe; it then runs in 60 ms instead of 12).
    """
    if pretrained_params is None:
        init = jax.jit(lambda: fresh(model.init_params(jax.random.PRNGKey(seed))),
                       out_shardings=shardings).lower()
        return init.compile(compiler_options=RUN_ONCE if platform == "cpu" else None)()
    params = dict(pretrained_params)
    params["wpe"] = {"embedding": params["wpe"]["embedding"][: model.config.block_size]}
    params = jax.device_put(params, shardings.params)
    return jax.jit(fresh, out_shardings=shardings, donate_argnums=0)(params)


def batch_spec(config: Config, dataset: Dataset, block_size: int, n_devices: int,
               micro_batch: int) -> dict[str, jax.ShapeDtypeStruct]:
    """The train step's batch as shapes: ``micro_batch`` rows per device, and as many
    micro-batches as make up the config's global batch."""
    rows = config.data.batch_size * config.train.grad_accum // n_devices
    one_row = BatchSource(dataset.train, config.data.mode, 1, block_size, 1, config.train.seed,
                          STREAMS["train"])(0)  # its keys and dtypes
    return {k: jax.ShapeDtypeStruct((rows // micro_batch, micro_batch * n_devices, v.shape[-1]),
                                    v.dtype) for k, v in one_row.items()}


def compile_ahead(ahead: CompileAhead, evaluations: list, model: GPT, tokenizer: Tokenizer,
                  train: TrainConfig, params: dict, shardings: dict) -> None:
    """Queue the evaluations' and the samples' compiles behind the train step's, from
    the parameters' shapes: placed as training holds them, and whole on the host."""
    placed = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          params, shardings)
    ahead.start("evaluations", lambda: [e.compile(placed) for e in evaluations])
    host = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
    ahead.start("samples", lambda: compile_samples(model, host, tokenizer, train))


def check_best_metric(best_metric: str, produced: list[str]) -> None:
    """Retention ranks by a metric some evaluation produces (with no evaluation at all,
    checkpoints are kept by recency alone)."""
    if produced and best_metric not in produced:
        raise ConfigError(f"train.best_metric={best_metric!r} is not a metric this run "
                          f"evaluates ({', '.join(produced)})")


def stop_after_nonfinite(m: dict, step: int, limit: int) -> None:
    """The loop's stop: ``limit`` consecutive skipped updates end the run."""
    overflow = bool(m.get("overflow", False))  # float16's own skip, never a failure
    if not overflow and not bool(m["applied"]) and int(m["nonfinite_streak"]) >= limit:
        raise NonFiniteError(f"{limit} consecutive steps had non-finite gradients (last: step "
                             f"{step}); stopping. Lower optim.lr or check the data, then "
                             "resume with train.resume=true")


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

    def __init__(self, config: Config, phases: PhaseTimes | None = None) -> None:
        self.config = config
        self.phases = phases or PhaseTimes()
        keep_freed_memory()  # before XLA allocates: see jaxgpt2.host_memory
        with self.phases.phase("set-up"):
            self._open(config)

    def _open(self, config: Config) -> None:
        """Devices, data and the run folder's lock, then everything else under it."""
        tc = config.train
        sharding.maybe_initialize_distributed()
        self.devices = sharding.select_devices(tc.device)
        self.mesh = sharding.make_mesh(config.mesh, self.devices)
        sharding.check_batch_divides(config.data.batch_size, self.mesh)
        self.auto_batch_budget = auto_batch_budget(tc, self.devices)  # refused before any file
        self.dataset = open_dataset(resolve_dataset_dir(config.data.dataset, config.data.cache_dir),
                                    min_tokens=config.model.block_size + 1)
        if tc.sample_tokens:
            check_sample_prompt(self.dataset.tokenizer(), tc.sample_prompt)
        self.out_dir = Path(tc.out_dir)
        choose_resume_step(tc, self.out_dir)  # refused before the folder is made or locked
        check_writable(self.out_dir)
        self.lock = RunLock.acquire(self.out_dir)  # held until run() ends
        self.ahead = CompileAhead(background=self.devices[0].platform == "cpu")
        try:
            self._set_up()
        except BaseException:
            self.ahead.cancel()
            self.lock.release()
            raise
        self.lock.record_holder()

    # -- set-up -------------------------------------------------------------------------
    def _set_up(self) -> None:
        """What is decided under the run folder's lock: resume (again: another run may
        have saved since the check before the lock), model, step, micro-batch
        (``train.auto_batch``), state, batches."""
        config, tc = self.config, self.config.train
        self.resume_step = agreed_resume_step(choose_resume_step(tc, self.out_dir))
        pretrained_config, pretrained_params = pretrained(config.model.init_from, self.out_dir,
                                                          self.resume_step)
        self.gpt_config = resolve_model_config(config, self.dataset, self.devices,
                                               pretrained_config)
        self.model = GPT(self.gpt_config)
        self.optimizer = build_optimizer(config.optim, tc.max_steps)
        self.checkpointer = Checkpointer(self.out_dir / "checkpoints", keep=tc.keep,
                                         best_metric=tc.best_metric,
                                         best_direction=tc.best_direction)
        loss_scale = config.optim.loss_scale if self.gpt_config.dtype == "float16" else None
        fresh = lambda params: create_train_state(params, self.optimizer, tc.seed, loss_scale)
        self.abstract_state = jax.eval_shape(
            lambda: fresh(self.model.init_params(jax.random.PRNGKey(tc.seed))))
        self.state_sharding = self._state_sharding(self.abstract_state)
        self._jit_step()
        if tc.auto_batch:  # before the config is recorded, or checked against a checkpoint
            self._choose_micro_batch()
        else:  # on another core while the state is made (jaxgpt2.ahead)
            self.ahead.start("train_step", partial(self.compile_step_at,
                                                   config.data.batch_size // len(self.devices)))
        self.resolved = resolved_config(self.config, self.gpt_config,
                                        self.dataset.meta["tokenizer"])
        self._build_state(fresh, loss_scale, pretrained_params)
        self._build_batches()

    def _build_state(self, fresh: Callable[[dict], TrainState], loss_scale: float | None,
                     pretrained_params: dict | None) -> None:
        if self.resume_step is not None:
            self.state = resume(self.checkpointer, self.resume_step, self.resolved,
                                self.abstract_state, self._state_sharding, loss_scale,
                                self._replicated())
        else:
            self.state = initial_state(self.model, fresh, self.config.train.seed,
                                       self.state_sharding, pretrained_params,
                                       self.devices[0].platform)

    def _state_sharding(self, abstract: TrainState) -> TrainState:
        shardings = sharding.state_shardings(abstract, self.mesh)
        return shardings.replace(step=self._replicated(), rng=self._replicated())

    def _replicated(self) -> jax.sharding.NamedSharding:
        return jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())

    def _jit_step(self) -> None:
        """The jitted train step; it compiles for a batch shape when first lowered."""
        self.batch_sharding = sharding.batch_sharding(self.mesh)
        step_fn = make_train_step(self.model, self.optimizer, self.config.train.debug_nan_steps,
                                  self.config.optim.loss_scale_interval)
        self.train_step = jit_train_step(
            step_fn, in_shardings=(self.state_sharding, self.batch_sharding),
            out_shardings=(self.state_sharding, self._replicated()))

    def compile_step_at(self, micro_batch: int) -> Any:
        """The train step compiled for ``micro_batch`` rows per device (accumulation makes
        up the config's global batch), from shapes alone: no state or batch need exist."""
        spec = batch_spec(self.config, self.dataset, self.gpt_config.block_size,
                          len(self.devices), micro_batch)
        return self.train_step.lower(self.abstract_state, spec).compile()

    def _choose_micro_batch(self) -> None:
        """``train.auto_batch``: the largest micro-batch whose compiled step fits the budget
        becomes the config's split, and its step is kept (``jaxgpt2.auto_batch``)."""
        config, tc, n_devices = self.config, self.config.train, len(self.devices)
        if self.resume_step is not None:  # refused before the compiles, not after
            check_compatible(self.checkpointer.read_meta(self.resume_step)["config"],
                             resolved_config(config, self.gpt_config,
                                             self.dataset.meta["tokenizer"]))
        rows = config.data.batch_size * tc.grad_accum // n_devices
        say("auto batch: compiling the train step to find the largest micro-batch that fits...")
        began = time.perf_counter()
        with self.phases.phase("compile"):
            micro, compiled, tried = choose_agreed_micro_batch(self.compile_step_at, rows,
                                                              self.auto_batch_budget)
        self.ahead.finished("train_step", compiled, time.perf_counter() - began)
        self.config = with_split(config, micro, n_devices, rows)
        say(choice_line(micro, n_devices, rows, self.auto_batch_budget, tried))

    def _build_batches(self) -> None:
        """The train step's batches, and the evaluations it is scored by."""
        tc, dc = self.config.train, self.config.data
        rows = sharding.process_rows(dc.batch_size)
        self.train_source = BatchSource(self.dataset.train, dc.mode, dc.batch_size,
                                        self.gpt_config.block_size, tc.grad_accum, tc.seed,
                                        STREAMS["train"], *rows)
        self.evaluations = make_evaluations(EvalContext(
            self.config, self.model, self.dataset, rows, self.place_batch,
            self.state_sharding.params, self.batch_sharding, self._replicated()))
        check_best_metric(tc.best_metric, [m for e in self.evaluations for m in e.metrics])
        compile_ahead(self.ahead, self.evaluations, self.model, self.dataset.tokenizer(), tc,
                      self.abstract_state.params, self.state_sharding.params)

    def place_batch(self, batch: dict) -> dict:
        return sharding.place_batch(batch, self.batch_sharding, self.config.data.batch_size)

    # -- the loop -----------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        """Every configured evaluation of the current parameters, by metric name."""
        self.ahead.wait("evaluations")
        return {k: v for e in self.evaluations for k, v in e(self.state.params).items()}

    def save(self, metrics: dict[str, float] | None = None) -> None:
        """Checkpoint the state with what a reader needs to use it without the config:
        the resolved config, the data position and the tokenizer."""
        tokenizer = {k: v for k, v in self.dataset.meta.items()
                     if k in ("tokenizer", "vocab_size", "chars", "eot_id")}
        data = {"seed": self.config.train.seed, "next_step": int(jax.device_get(self.state.step))}
        self.checkpointer.save(self.state, {"config": self.resolved, "data": data,
                                            "tokenizer": tokenizer}, metrics)

    def run(self) -> dict:
        """Train from the current step to ``train.max_steps``; returns a summary."""
        return TrainingRun(self).run()

    def sample(self, tokens: int | None = None) -> str:
        """A sample of the current model, ``tokens`` or ``train.sample_tokens`` long."""
        params = sharding.to_host(self.state.params)  # whole, even if split across hosts
        self.ahead.wait("samples")
        return sample_text(self.model, params, self.dataset.tokenizer(), self.config.train, tokens)


class TrainingRun:
    """One call of ``Trainer.run``: the loop, its reporter, batches and stop signals.

    Each step's metrics are read one step late, after the next step is dispatched (the
    host never stalls the device to log), unless an evaluation or a save needs them now.
    """

    def __init__(self, trainer: Trainer) -> None:
        self.trainer, self.config = trainer, trainer.config
        self.start = int(jax.device_get(trainer.state.step))
        self.reporter = Reporter(self.config.train, trainer.out_dir, self.start,
                                 flops_per_token(trainer.gpt_config),
                                 peak_flops(trainer.devices))

    def run(self) -> dict:
        t = self.trainer
        (t.out_dir / "config.yaml").write_text(yaml.safe_dump(t.resolved, sort_keys=False))
        for line in startup_lines(self.config, t.gpt_config, t.devices, t.mesh, t.state):
            say(line)
        prefetch = Prefetcher(t.train_source, t.place_batch, self.start, self.config.data.prefetch)
        try:
            with stop_on_signals() as stop, t.phases.phase("steps"):
                self._loop(prefetch, stop)
        except NonFiniteError as err:
            # Skipped steps leave the weights as the last good step made them, so the
            # state is worth keeping: a resume continues after the bad batches.
            t.save()
            raise NonFiniteError(f"{err}; saved step {int(jax.device_get(t.state.step))} "
                                 "(its weights are the last finite update's)") from None
        finally:
            prefetch.close()
            self.reporter.close()
            t.checkpointer.wait()
            t.lock.release()
        return {**self.reporter.summary, "step": int(jax.device_get(t.state.step))}

    def _read(self, step: int, metrics: dict, force: bool = False) -> None:
        m = self.reporter.read_step(step, metrics, force)
        stop_after_nonfinite(m, step, self.config.optim.max_consecutive_nonfinite)

    def _loop(self, prefetch: Prefetcher, stop: dict) -> None:
        t, tc, reporter = self.trainer, self.config.train, self.reporter
        step, pending = self.start, None  # pending: (step, device metrics) of the last step
        step_fn = None
        while step < tc.max_steps:
            _, batch = prefetch.next()
            step_fn = step_fn or self._compile()
            t.state, metrics = step_fn(t.state, batch)
            t.checkpointer.check_for_errors()
            step += 1
            if pending is not None:
                self._read(*pending)
            pending = (step, metrics)
            reporter.step_done()
            must_eval = step % tc.eval_interval == 0 or step == tc.max_steps
            must_save = step % tc.save_interval == 0 or step == tc.max_steps
            if must_eval or must_save or stop["signal"]:
                self._read(*pending, force=True)
                pending = None
            with t.phases.phase("evaluation"):
                results = self._evaluate(step) if must_eval else {}
            if must_save or stop["signal"]:
                with t.phases.phase("saves"):
                    t.save(results)
            if must_eval or must_save:
                reporter.throughput.restart()  # exclude eval/save time
            if stop["signal"]:
                say(f"{stop['signal']}: saved step {step}; resume with: python train.py "
                    f"--config <same config> train.out_dir={t.out_dir} train.resume=true")
                reporter.summary["stopped_by"] = stop["signal"]
                return
        if pending is not None:
            self._read(*pending, force=True)

    def _compile(self) -> Callable:
        """The train step compiled ahead (``jaxgpt2.ahead``, or by the auto batch search),
        waited for and timed, so that compilation never counts towards the rate or the
        ETA, with XLA's memory analysis for the start-up summary. A step function that is
        not a jitted one (tests wrap it to record losses) is called as it is: the compile
        ahead filled jit's cache for the step it wraps."""
        t = self.trainer
        if not t.ahead.done("train_step"):
            say("compiling the train step...")
        with t.phases.phase("compile"):
            compiled, seconds = t.ahead.result("train_step")
        self.reporter.compiled(self.start, seconds)
        memory = compiled.memory_analysis()
        if memory is not None:
            say(memory_line(memory, t.gpt_config, self.config))
        return compiled if hasattr(t.train_step, "lower") else t.train_step

    def _evaluate(self, step: int) -> dict[str, float]:
        """The evaluations' metrics (returned), a sample when ``train.eval_sample_tokens``
        asks for one, and the run's redrawn ``loss.png``."""
        t, tc = self.trainer, self.config.train
        results = t.evaluate()
        if results:
            self.reporter.evaluated(step, results)
        if tc.eval_sample_tokens:
            self.reporter.sampled(step, [t.sample(tc.eval_sample_tokens)])
        self.reporter.redraw_plot()
        return results


def sample_text(model: GPT, params: dict, tokenizer: Tokenizer, train: TrainConfig,
                tokens: int | None = None) -> str:
    """``tokens`` (default ``train.sample_tokens``) tokens after ``train.sample_prompt``
    (temperature 0.8, top-k 200, seeded by ``train.seed``), prompt included."""
    prompt, sampling = _sampling(tokenizer, train, tokens or train.sample_tokens)
    ids = generate(model, params, prompt, seed=train.seed, **sampling)
    return tokenizer.decode(ids[0].tolist())


def compile_samples(model: GPT, params: dict, tokenizer: Tokenizer, train: TrainConfig) -> None:
    """Compile the samples a run will draw (at the end, and at each evaluation), from the
    host parameters' shapes (``jaxgpt2.ahead``)."""
    for tokens in {train.sample_tokens, train.eval_sample_tokens} - {0}:
        prompt, sampling = _sampling(tokenizer, train, tokens)
        compile_generate(model, params, prompt, **sampling)


def _sampling(tokenizer: Tokenizer, train: TrainConfig, tokens: int) -> tuple[np.ndarray, dict]:
    prompt = encode_prompt(tokenizer, train.sample_prompt)
    return np.asarray([prompt]), {"max_new_tokens": tokens, "temperature": 0.8, "top_k": 200,
                                  "vocab_limit": tokenizer.vocab_size}
