"""The largest micro-batch that fits one device, per remat policy, and its throughput.

    python docs/largest_batch.py [--preset gpt2-xl] [--rows 64] [--remat none full ...]

For each policy, ``jaxgpt2.auto_batch.choose_micro_batch`` (what ``train.auto_batch``
runs) finds the largest divisor of ``--rows`` whose compiled train step fits the
device's memory, from XLA's memory analysis; that step is then timed on random ids
(bf16 compute, float32 master weights, AdamW) and its tokens/s and MFU printed as a
table row.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from jaxgpt2.auto_batch import choose_micro_batch, memory_budget
from jaxgpt2.config import PRESETS, GPTConfig, OptimConfig
from jaxgpt2.model import GPT
from jaxgpt2.optim import build_optimizer
from jaxgpt2.step import create_train_state, jit_train_step, make_train_step
from jaxgpt2.summary import flops_per_token, peak_flops, size_text


def measure(preset: str, remat: str, rows: int, budget: int, steps: int) -> dict:
    """Search the micro-batch for one remat policy, then time its compiled step."""
    gpt = GPTConfig(**PRESETS[preset], vocab_size=50257, block_size=1024, dtype="bfloat16",
                    scan_layers=False, remat=remat)
    model, optimizer = GPT(gpt), build_optimizer(OptimConfig(), 1000)
    abstract = jax.eval_shape(lambda: create_train_state(
        model.init_params(jax.random.PRNGKey(0)), optimizer, 0))
    step_fn = jit_train_step(make_train_step(model, optimizer))

    def compile_at(micro: int):
        spec = {k: jax.ShapeDtypeStruct((1, micro, 1024), dtype) for k, dtype in
                (("input_ids", np.int32), ("targets", np.int32), ("loss_mask", np.float32))}
        return step_fn.lower(abstract, spec).compile()

    began = time.perf_counter()
    micro, compiled, tried = choose_micro_batch(compile_at, rows, budget)
    search_s = time.perf_counter() - began
    state = create_train_state(model.init_params(jax.random.PRNGKey(0)), optimizer, 0)
    ids = np.random.default_rng(0).integers(0, 50257, (1, micro, 1025)).astype(np.int32)
    batch = jax.device_put({"input_ids": ids[..., :-1], "targets": ids[..., 1:],
                            "loss_mask": np.ones((1, micro, 1024), np.float32)})
    for _ in range(2):
        state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    began = time.perf_counter()
    for _ in range(steps):
        state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    seconds = (time.perf_counter() - began) / steps
    tokens_per_s = micro * 1024 / seconds
    peak = peak_flops(jax.devices()[:1])
    return {"remat": remat, "micro_batch": micro, "tried": tried, "search_s": search_s,
            "ms": seconds * 1e3, "tokens_per_s": tokens_per_s,
            "mfu": tokens_per_s * flops_per_token(gpt) / peak if peak else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="gpt2-xl", choices=list(PRESETS))
    parser.add_argument("--rows", type=int, default=64, help="largest micro-batch considered "
                        "(its divisors are the candidates)")
    parser.add_argument("--remat", nargs="+", default=["none", "full"])
    parser.add_argument("--fraction", type=float, default=0.9)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    budget = memory_budget(jax.devices()[0], args.fraction, None)
    print(f"{args.preset} on {jax.devices()[0].device_kind}: budget {size_text(budget)}")
    print("| remat | micro-batch | step needs | ms/step | tokens/s | MFU | search |")
    print("|---|---|---|---|---|---|---|", flush=True)
    for remat in args.remat:  # each row as it is measured: an XL search takes minutes
        r = measure(args.preset, remat, args.rows, budget, args.steps)
        needed = dict(r["tried"])[r["micro_batch"]]
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
        print(f"| {r['remat']} | {r['micro_batch']} | {size_text(needed)} | {r['ms']:.0f} | "
              f"{r['tokens_per_s']:,.0f} | {mfu} | {r['search_s']:.0f} s, tried "
              + ", ".join(f"{m}: {size_text(b)}" for m, b in r["tried"]) + " |", flush=True)

if __name__ == "__main__":
    main()
