"""The CPU baby GPT's train step under XLA:CPU variants, each in its own process.

    python docs/cpu_step_bench.py [--rounds 3] [--steps 60] [VARIANT ...]

The step is configs/shakespeare_char_cpu.yaml's (4 layers, 128 wide, batch 12 x 64,
float32, AdamW) on random ids. A variant is a set of XLA flags or config overrides; the
variants run round-robin, ``--rounds`` times, so drift of a shared machine hits all of
them alike. Prints each variant's median ms/step and compile seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

VARIANTS = {
    "default": ({}, []),
    "onednn": ({"XLA_FLAGS": "--xla_cpu_use_onednn=true"}, []),
    "no_ynn_fusion": ({"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type="}, []),
    "vector_512": ({"XLA_FLAGS": "--xla_cpu_prefer_vector_width=512"}, []),
    "scan_layers": ({}, ["model.scan_layers=true"]),
    "one_thread": ({"XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false "
                                 "intra_op_parallelism_threads=1"}, []),
}


def measure(overrides: list[str], steps: int) -> dict:
    """One process: compile the recipe's step, then time ``steps`` steps."""
    import jax
    import numpy as np

    from jaxgpt2.config import load_config
    from jaxgpt2.model import GPT
    from jaxgpt2.optim import build_optimizer
    from jaxgpt2.step import create_train_state, jit_train_step, make_train_step

    config = load_config("configs/shakespeare_char_cpu.yaml", ["model.vocab_size=65", *overrides])
    gpt = config.model.gpt_config()
    model = GPT(gpt)
    tx = build_optimizer(config.optim, config.train.max_steps)
    state = create_train_state(model.init_params(jax.random.PRNGKey(0)), tx, 0)
    ids = np.random.default_rng(0).integers(0, 65, (1, 12, 65)).astype(np.int32)
    batch = {"input_ids": ids[..., :-1], "targets": ids[..., 1:],
             "loss_mask": np.ones((1, 12, 64), np.float32)}
    began = time.perf_counter()
    step = jit_train_step(make_train_step(model, tx)).lower(state, batch).compile()
    compile_s = time.perf_counter() - began
    for _ in range(5):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    began = time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    return {"ms": (time.perf_counter() - began) / steps * 1e3, "compile_s": compile_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # the child's side
    parser.add_argument("variants", nargs="*", default=list(VARIANTS))
    args = parser.parse_args()
    if args.measure is not None:
        print(json.dumps(measure(json.loads(args.measure), args.steps)))
        return
    results: dict[str, list[dict]] = {v: [] for v in args.variants}
    for _ in range(args.rounds):
        for name in args.variants:
            env, overrides = VARIANTS[name]
            out = subprocess.run([sys.executable, __file__, "--steps", str(args.steps),
                                  "--measure", json.dumps(overrides)],
                                 env={**os.environ, "JAX_PLATFORMS": "cpu", **env},
                                 capture_output=True, text=True, check=True)
            results[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"{'variant':<16}{'ms/step':>10}{'compile s':>11}")
    for name, runs in results.items():
        print(f"{name:<16}{statistics.median(r['ms'] for r in runs):>10.1f}"
              f"{statistics.median(r['compile_s'] for r in runs):>11.1f}")


if __name__ == "__main__":
    main()
