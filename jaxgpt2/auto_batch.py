"""``train.auto_batch``: the largest micro-batch per device whose compiled step fits.

The step's memory is read from XLA's analysis of the compiled program, before anything
trains, so the search never runs a step that could fail with out-of-memory. The global
batch (rows per optimizer step) is kept: a candidate micro-batch divides the rows each
device sees per step, and gradient accumulation makes up the rest.

The search compiles the smallest candidate first (if even that does not fit, nothing
will), then treats memory as affine in the micro-batch (``fixed + per_row * m``, which is
what XLA's buffers are: parameters, optimizer state and the batch are fixed; activations
grow with the rows): the line through the two nearest measurements predicts the largest
candidate that fits, which is compiled to check it. It ends when the chosen candidate is
measured to fit and the next larger one measured not to (or there is none), so the
choice is the largest that fits whenever memory grows with the micro-batch, usually
after four compiles. Starting small rather than at the whole batch keeps the compiles
near the budget: one far over it would only be thrown away.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxgpt2.config import Config, TrainConfig
from jaxgpt2.errors import ConfigError
from jaxgpt2.summary import size_text

GIB = 2**30


def memory_budget(device: jax.Device, fraction: float, override_gb: float | None) -> int:
    """Bytes one device's train step may use: ``override_gb`` GiB when given, else
    ``fraction`` of what the device's allocator may hold (GPU/TPU report it; the rest is
    left for evaluation, prefetched batches and fragmentation)."""
    if override_gb is not None:
        return int(override_gb * GIB)
    limit = (device.memory_stats() or {}).get("bytes_limit")
    if not limit:
        raise ConfigError(f"train.auto_batch=true needs a memory budget, and the "
                          f"{device.platform} device does not report its memory; set "
                          "train.auto_batch_memory_gb=<GiB per device>")
    return int(limit * fraction)


def auto_batch_budget(train: TrainConfig, devices: list[jax.Device]) -> int | None:
    """This process's budget per device with ``train.auto_batch``, else None."""
    if not train.auto_batch:
        return None
    local = next(d for d in devices if d.process_index == jax.process_index())
    return memory_budget(local, train.auto_batch_fraction, train.auto_batch_memory_gb)


def step_bytes(compiled: Any) -> int:
    """Device bytes one call of a compiled program needs, from ``memory_analysis()``:
    arguments + outputs - aliased (a donated argument's buffer holds an output) +
    temporaries (XLA's one preassigned block for every intermediate) + generated code.

    ``peak_memory_in_bytes`` is not used: on CPU (jax 0.10.2) it reports the arguments
    alone, without the temporaries that grow with the micro-batch.
    """
    m = compiled.memory_analysis()
    if m is None:
        raise ConfigError("train.auto_batch: XLA reports no memory analysis on this "
                          "backend; set data.batch_size and train.grad_accum by hand")
    return (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
            + m.temp_size_in_bytes + m.generated_code_size_in_bytes)


def choose_micro_batch(compile_at: Callable[[int], Any], global_rows_per_device: int,
                       budget: int) -> tuple[int, Any, list[tuple[int, int]]]:
    """The largest divisor ``m`` of ``global_rows_per_device`` whose step, compiled by
    ``compile_at(m)``, needs at most ``budget`` bytes (see the module docstring for the
    search); returns ``m``, its compiled step (for the trainer to run) and every
    ``(micro_batch, bytes)`` measured, in the order tried."""
    rows = global_rows_per_device
    candidates = [d for d in range(1, rows + 1) if rows % d == 0]
    measured: dict[int, int] = {}

    def measure(micro: int) -> Any:
        compiled = compile_at(micro)
        measured[micro] = step_bytes(compiled)
        return compiled

    best = (1, measure(1))
    if measured[1] > budget:
        raise ConfigError(
            f"train.auto_batch: the train step needs {size_text(measured[1])} per device even "
            f"at micro-batch 1, over the budget of {size_text(budget)}; save activation "
            "memory with model.remat=full (or dots_saveable), train a smaller model, or raise "
            "the budget (train.auto_batch_memory_gb or train.auto_batch_fraction)")
    while (micro := _next_candidate(candidates, measured, budget)) is not None:
        compiled = measure(micro)
        if measured[micro] <= budget:
            best = (micro, compiled)
    return best[0], best[1], list(measured.items())


def _next_candidate(candidates: list[int], measured: dict[int, int], budget: int) -> int | None:
    """The next micro-batch to compile, or None once the largest fitting one is known.

    Between the largest measured fit ``lo`` and the smallest measured misfit ``hi``, the
    line through the two nearest measurements picks the largest candidate predicted to
    fit; when none is, the one just above ``lo`` is checked, so that the answer is
    proven by a measurement on each side.
    """
    fits = sorted(m for m, b in measured.items() if b <= budget)
    misfits = sorted(m for m, b in measured.items() if b > budget)
    lo, hi = fits[-1], (misfits[0] if misfits else None)
    between = [c for c in candidates if c > lo and (hi is None or c < hi)]
    if not between:
        return None
    if hi is not None:
        a, b = lo, hi
    elif len(fits) > 1:
        a, b = fits[-2], lo
    else:  # one measurement: the second smallest candidate gives the slope
        return between[0]
    per_row = (measured[b] - measured[a]) / (b - a)
    predicted_fits = [c for c in between if measured[a] + per_row * (c - a) <= budget]
    return predicted_fits[-1] if predicted_fits else between[0]


def agreed_micro_batch(micro_batch: int) -> int:
    """The smallest choice of all processes: they must run the same program, and their
    compiled sizes may differ slightly (each GPU autotunes its own kernels)."""
    if jax.process_count() == 1:
        return micro_batch
    return int(np.min(multihost_utils.process_allgather(np.asarray(micro_batch))))


def choose_agreed_micro_batch(compile_at: Callable[[int], Any], global_rows_per_device: int,
                              budget: int) -> tuple[int, Any, list[tuple[int, int]]]:
    """``choose_micro_batch``, then the choice every process agrees on (recompiled here
    when another process fits less)."""
    micro, compiled, tried = choose_micro_batch(compile_at, global_rows_per_device, budget)
    agreed = agreed_micro_batch(micro)
    if agreed != micro:
        compiled = compile_at(agreed)
        tried.append((agreed, step_bytes(compiled)))
    return agreed, compiled, tried


def with_split(config: Config, micro_batch: int, n_devices: int,
               global_rows_per_device: int) -> Config:
    """The config with the chosen split: the same global batch, ``micro_batch`` rows per
    device and accumulation for the rest."""
    return dataclasses.replace(
        config, data=dataclasses.replace(config.data, batch_size=micro_batch * n_devices),
        train=dataclasses.replace(config.train,
                                  grad_accum=global_rows_per_device // micro_batch))


def choice_line(micro_batch: int, n_devices: int, global_rows_per_device: int, budget: int,
                tried: list[tuple[int, int]]) -> str:
    """The printed decision: the split, the chosen step's bytes against the budget, and
    every candidate measured."""
    needed = dict(tried)[micro_batch]
    accum = global_rows_per_device // micro_batch
    return (f"auto batch: micro-batch {micro_batch} per device x {accum} accumulation "
            f"(global {global_rows_per_device * n_devices}); step needs {size_text(needed)} "
            f"of {size_text(budget)} budget (tried "
            + ", ".join(f"{m}: {size_text(b)}" for m, b in tried) + ")")
