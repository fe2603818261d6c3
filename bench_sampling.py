"""Time generation with and without the KV cache: ``python bench_sampling.py [--preset tiny]``.

Default: a GPT-2 124M-shaped model with random weights, batch 1, a 16-token prompt and
256 greedy new tokens, in the compute dtype ``auto`` picks (bfloat16 on GPU). ``--preset
tiny`` is a seconds-long CPU check. Each path is run once to compile, then timed
``--repeats`` times (the best is reported); a timing ends when the tokens are on the host.
The uncached path runs a full ``block_size`` forward pass per token (see
``jaxgpt2/generate.py``), so its cost per token does not depend on the prompt length;
past ``block_size`` (prompt + new tokens) the cached run falls back to that path too.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import numpy as np

from jaxgpt2.config import GPTConfig
from jaxgpt2.generate import generate
from jaxgpt2.model import GPT, compute_dtype

PRESETS = {
    "gpt2": GPTConfig(),  # GPT-2 124M: GPTConfig's defaults
    "tiny": GPTConfig(vocab_size=512, block_size=512, n_layer=2, n_head=4, n_embd=64),
}


def time_generate(model: GPT, params, prompt: np.ndarray, new_tokens: int, use_cache: bool,
                  repeats: int) -> tuple[float, float]:
    """(first call seconds incl. compile, best of ``repeats`` seconds)."""
    start = time.perf_counter()
    generate(model, params, prompt, new_tokens, temperature=0.0, use_cache=use_cache)
    first = time.perf_counter() - start
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        generate(model, params, prompt, new_tokens, temperature=0.0, use_cache=use_cache)
        best = min(best, time.perf_counter() - start)
    return first, best


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=tuple(PRESETS), default="gpt2")
    parser.add_argument("--new_tokens", type=int, default=256)
    parser.add_argument("--prompt_len", type=int, default=16)
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"))
    parser.add_argument("--scan_layers", choices=("true", "false"),
                        help="default: the preset's (true)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    config = dataclasses.replace(PRESETS[args.preset], dtype=args.dtype)
    if args.scan_layers:
        config = dataclasses.replace(config, scan_layers=args.scan_layers == "true")
    model = GPT(config)
    params = jax.jit(model.init_params)(jax.random.PRNGKey(0))
    prompt = np.random.default_rng(0).integers(0, config.vocab_size,
                                               (args.batch_size, args.prompt_len))
    device = jax.devices()[0]
    print(f"device: {device.device_kind} ({device.platform}); model: {args.preset} "
          f"({config.n_layer} layers, {config.n_embd} wide, block {config.block_size}), "
          f"compute {np.dtype(compute_dtype(config)).name}, scan_layers {config.scan_layers}; "
          f"batch {args.batch_size}, prompt {args.prompt_len}, {args.new_tokens} new tokens, "
          f"greedy; best of {args.repeats}")
    print("| path | first call s (compile) | best s | ms / token | tokens / s |")
    print("|---|---|---|---|---|")
    best = {}
    for name, use_cache in (("cached", True), ("uncached", False)):
        first, best[name] = time_generate(model, params, prompt, args.new_tokens, use_cache,
                                          args.repeats)
        tokens = args.new_tokens * args.batch_size
        print(f"| {name} | {first:.2f} | {best[name]:.3f} | "
              f"{1e3 * best[name] / args.new_tokens:.2f} | {tokens / best[name]:,.0f} |")
    print(f"speed-up {best['uncached'] / best['cached']:.1f}x")


if __name__ == "__main__":
    main()
