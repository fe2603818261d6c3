"""Training-step throughput: ``python bench.py [--preset gpt2] [--variants loop,scan]``.

Times the real ``train_step`` (model, loss, clipped AdamW under ``apply_if_finite``, all
in one jitted, donated call), after warm-up, with one device sync at the end of the timed
steps. Prints ms/step, tokens/s, MFU and peak device memory per variant.

Tokens come from the bundled Tiny Shakespeare encoded with GPT-2's BPE (``--tokens
text``, the default) or uniformly at random (``--tokens random``, as nanoGPT's
``real_data=False``). The difference matters: real text repeats a few ids thousands of
times per batch, and a step can be data-dependent (an embedding gradient summed by
atomic adds contends on those ids), so random ids can flatter a step.

MFU counts 6N + 12·L·T·d FLOPs per token (N: parameters without position embeddings,
over the real vocabulary), against ``--peak_tflops`` (989 = H100 SXM dense bf16).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import time

import jax
import numpy as np

from jaxgpt2.config import PRESETS, GPTConfig, OptimConfig
from jaxgpt2.model import GPT
from jaxgpt2.optim import build_optimizer
from jaxgpt2.prepare import bundled_corpus
from jaxgpt2.step import create_train_state, make_train_step
from jaxgpt2.summary import flops_per_token
from jaxgpt2.tokenizer import GPT2Tokenizer

VARIANTS = {
    "loop": dict(scan_layers=False),
    "scan": dict(scan_layers=True),
    "loop_remat_dots": dict(scan_layers=False, remat="dots_with_no_batch_dims_saveable"),
    "loop_remat_full": dict(scan_layers=False, remat="full"),
    "loop_xla_attention": dict(scan_layers=False, attention="xla"),
}


@functools.cache
def _corpus_ids() -> np.ndarray:
    """The bundled corpus in GPT-2 BPE, encoded once per run (not once per variant)."""
    return np.asarray(GPT2Tokenizer().encode(bundled_corpus().read_text()))


def token_windows(kind: str, rows: int, block_size: int, vocab_size: int) -> np.ndarray:
    """(1, rows, block_size + 1) int32 ids: consecutive windows of the bundled corpus
    (GPT-2 BPE, ids taken modulo ``vocab_size`` for small test vocabularies) or random."""
    rng = np.random.default_rng(0)
    if kind == "random":
        ids = rng.integers(0, vocab_size, rows * (block_size + 1))
    else:
        corpus = _corpus_ids() % vocab_size
        starts = rng.integers(0, corpus.size - block_size - 1, rows)
        ids = np.concatenate([corpus[s:s + block_size + 1] for s in starts])
    return ids.reshape(1, rows, block_size + 1).astype(np.int32)


def bench_variant(cfg: GPTConfig, batch_size: int, steps: int, warmup: int,
                  tokens: str = "text") -> dict:
    model = GPT(cfg)
    optim = OptimConfig(warmup_steps=10)
    tx = build_optimizer(optim, 1000)
    step = jax.jit(make_train_step(model, tx), donate_argnums=0)
    scale = optim.loss_scale if cfg.dtype == "float16" else None  # float16 trains with one
    state = jax.jit(lambda: create_train_state(model.init_params(jax.random.PRNGKey(0)), tx, 0,
                                               scale))()
    ids = token_windows(tokens, batch_size, cfg.block_size, cfg.vocab_size)
    batch = jax.device_put({"input_ids": ids[..., :-1], "targets": ids[..., 1:],
                            "loss_mask": np.ones((1, batch_size, cfg.block_size), np.float32)})
    t0 = time.perf_counter()
    state, metrics = step(state, batch)
    first_loss = float(metrics["loss"])
    compile_s = time.perf_counter() - t0
    for _ in range(warmup - 1):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    t0 = time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state, batch)
    jax.block_until_ready((state, metrics))
    elapsed = (time.perf_counter() - t0) / steps
    tokens = batch_size * cfg.block_size / elapsed
    stats = jax.devices()[0].memory_stats() or {}
    return {"ms_per_step": elapsed * 1e3, "tokens_per_sec": tokens,
            "first_loss": first_loss, "last_loss": float(metrics["loss"]),
            "compile_s": compile_s, "peak_gib": stats.get("peak_bytes_in_use", 0) / 2**30,
            "flops_per_token": flops_per_token(cfg)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="gpt2", choices=[*PRESETS, "tiny"])
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--block_size", type=int, default=1024)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--variants", default="loop,scan")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--tokens", default="text", choices=("text", "random"))
    parser.add_argument("--peak_tflops", type=float, default=989.0)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()

    sizes = PRESETS.get(args.preset, dict(n_layer=2, n_head=2, n_embd=64))
    base = GPTConfig(vocab_size=50257, block_size=args.block_size, dtype=args.dtype, **sizes)
    results = {}
    for name in args.variants.split(","):
        cfg = dataclasses.replace(base, **VARIANTS[name])
        results[name] = bench_variant(cfg, args.batch_size, args.steps, args.warmup, args.tokens)
        jax.clear_caches()
    device = jax.devices()[0]
    print(f"\n{args.preset}, batch {args.batch_size} x {args.block_size}, {args.tokens} tokens, "
          f"{device.device_kind}, jax {jax.__version__}")
    print(f"{'variant':<22}{'ms/step':>9}{'tokens/s':>12}{'MFU':>7}{'peak GiB':>10}"
          f"{'compile s':>11}{'loss@1':>9}")
    for name, r in results.items():
        mfu = r["tokens_per_sec"] * r["flops_per_token"] / (args.peak_tflops * 1e12)
        r["mfu"] = mfu
        print(f"{name:<22}{r['ms_per_step']:>9.1f}{r['tokens_per_sec']:>12,.0f}{mfu:>7.1%}"
              f"{r['peak_gib']:>10.1f}{r['compile_s']:>11.1f}{r['first_loss']:>9.4f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device.device_kind, "args": vars(args), "results": results}, f,
                      indent=1)


if __name__ == "__main__":
    main()
