"""Training-step throughput, optionally against nanoGPT's bench.py in the same call.

``python bench.py [--preset gpt2] [--variants loop,scan] [--batch_size 32,64]
[--bias|--no-bias] [--repeats N] [--tokens text|random] [--compare_nanogpt DIR]``.

Times the real ``train_step`` (model, loss, clipped AdamW under ``apply_if_finite``, all
in one jitted, donated call), after warm-up, with one device sync at the end of the timed
steps. Prints ms/step, tokens/s, MFU and peak device memory per (variant, batch size); with
``--repeats N`` each is measured N times and the median quoted. ``--bias/--no-bias``
overrides the preset's biases (GPT-2 has them; nanoGPT's architecture drops them).

Tokens come from the bundled Tiny Shakespeare encoded with GPT-2's BPE (``--tokens
text``, the default) or uniformly at random (``--tokens random``, as nanoGPT's
``real_data=False``). The difference matters: real text repeats a few ids thousands of
times per batch, and a step can be data-dependent (an embedding gradient summed by
atomic adds contends on those ids), so random ids can flatter a step.

``--compare_nanogpt DIR`` runs nanoGPT's own ``DIR/bench.py`` (a git-ignored clone of
karpathy/nanoGPT) in a subprocess of this interpreter, per batch size, with the same
block size, bias, compute dtype and random ids, alternating with ours so drift hits
both, then prints ours/nanoGPT tokens per second. nanoGPT's bench.py hard-codes GPT-2
124M's sizes and its own steps (10 burn-in, 20 timed, a host sync per step) and pads the
vocabulary to 50304; only ``--preset gpt2`` compares. Each of our variants is then
measured in a process of its own, with JAX's preallocation off
(``XLA_PYTHON_CLIENT_PREALLOCATE=false``), so PyTorch finds the GPU memory free.

MFU counts 6N + 12·L·T·d FLOPs per token (N: parameters without position embeddings,
over the real vocabulary), against ``--peak_tflops`` (989 = H100 SXM dense bf16); the
nanoGPT row is counted the same way, so MFUs compare as tokens/s do.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np

from jaxgpt2.config import PRESETS, GPTConfig, OptimConfig, resolve_auto
from jaxgpt2.errors import InputError, NotFoundError, UserError, report_errors
from jaxgpt2.model import GPT
from jaxgpt2.optim import build_optimizer
from jaxgpt2.prepare import bundled_corpus
from jaxgpt2.step import create_train_state, jit_train_step, make_train_step
from jaxgpt2.summary import flops_per_token
from jaxgpt2.tokenizer import GPT2Tokenizer

VARIANTS = {
    "loop": dict(scan_layers=False),
    "scan": dict(scan_layers=True),
    "loop_remat_dots": dict(scan_layers=False, remat="dots_with_no_batch_dims_saveable"),
    "loop_remat_full": dict(scan_layers=False, remat="full"),
    "loop_xla_attention": dict(scan_layers=False, attention="xla"),
    "loop_xla_kernels": dict(scan_layers=False, kernels="xla"),
}
TINY = dict(n_layer=2, n_head=2, n_embd=64)  # --preset tiny: the CPU test's model

# nanoGPT's bench.py hard-codes these in its GPTConfig; only its batch_size, block_size,
# bias, real_data, seed, device, dtype, compile and profile are configurator keys.
NANOGPT_SIZES = dict(n_layer=12, n_head=12, n_embd=768)
NANOGPT_ROW = "nanoGPT bench.py (torch.compile)"
NANOGPT_CLONE = ("clone karpathy/nanoGPT into third_party/nanoGPT (git-ignored): "
                 "git clone https://github.com/karpathy/nanoGPT third_party/nanoGPT")
_NANOGPT_TIME = re.compile(r"^time per iteration: ([0-9.]+)ms, MFU: ([0-9.]+)%", re.M)
_NANOGPT_LOSS = re.compile(r"^\d+/\d+ loss: (\S+)$", re.M)
_NANOGPT_PARAMS = re.compile(r"^number of parameters: ([0-9.]+)M", re.M)


class NanoGPTError(UserError, RuntimeError):
    """nanoGPT's bench.py failed or printed no timing: its output's tail and the fix, so a
    comparison run ends in one readable message rather than a subprocess traceback."""


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
                  tokens: str = "text") -> dict[str, Any]:
    """One timed measurement of ``train_step``: the first step (compile) and the warm-up
    are excluded, and the timed steps sync once, as a training loop would."""
    model = GPT(cfg)
    optim = OptimConfig(warmup_steps=10)
    tx = build_optimizer(optim, 1000)
    step = jit_train_step(make_train_step(model, tx))
    scale = optim.loss_scale if cfg.dtype == "float16" else None  # float16 trains with one
    state = jax.jit(lambda: create_train_state(model.init_params(jax.random.PRNGKey(0)), tx, 0,
                                               scale))()
    param_count = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state.params))
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
    stats = jax.devices()[0].memory_stats() or {}
    return {"ms_per_step": elapsed * 1e3, "tokens_per_sec": batch_size * cfg.block_size / elapsed,
            "first_loss": first_loss, "last_loss": float(metrics["loss"]),
            "compile_s": compile_s, "peak_gib": stats.get("peak_bytes_in_use", 0) / 2**30,
            "flops_per_token": flops_per_token(cfg), "param_count": param_count}


def parse_batch_sizes(text: str) -> list[int]:
    """``32,64`` -> [32, 64]: several batch sizes in one call, so each program's best
    batch is measured under the same conditions."""
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive integers like 32,64, got {text!r}")
    return sizes


def build_parser() -> argparse.ArgumentParser:
    """The command line; ``--tokens`` and ``--bias`` default to None so that an explicit
    choice can be told from the default (a comparison forces random ids, and the preset
    decides biases)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="gpt2", choices=[*PRESETS, "tiny"])
    parser.add_argument("--batch_size", type=parse_batch_sizes, default=[32],
                        help="one batch size or a comma list (32,64): a row each")
    parser.add_argument("--block_size", type=int, default=1024)
    parser.add_argument("--bias", action=argparse.BooleanOptionalAction, default=None,
                        help="biases in linear and layernorm layers (default: the preset's)")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--variants", default="loop,scan")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=1,
                        help="measure each row N times (alternating programs); quote medians")
    parser.add_argument("--tokens", choices=("text", "random"), default=None,
                        help="default text; random (forced) with --compare_nanogpt")
    parser.add_argument("--peak_tflops", type=float, default=989.0)
    parser.add_argument("--compare_nanogpt", metavar="DIR",
                        help="also run DIR/bench.py (karpathy/nanoGPT) at the same settings")
    parser.add_argument("--json", help="also write all rows to this file")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # see _bench_in_child
    return parser


def base_config(args: argparse.Namespace) -> GPTConfig:
    """The benchmarked architecture before a variant's compute options: the preset's sizes,
    its own biases unless ``--bias/--no-bias`` says otherwise."""
    sizes = PRESETS.get(args.preset, TINY)
    cfg = GPTConfig(vocab_size=50257, block_size=args.block_size, dtype=args.dtype, **sizes)
    return cfg if args.bias is None else dataclasses.replace(cfg, bias=args.bias)


def check_nanogpt(args: argparse.Namespace) -> Path:
    """The nanoGPT clone's folder, after refusing what would not compare like for like:
    a missing clone, another architecture than the one its bench.py hard-codes, or text
    tokens against its random ids. Runs before any measurement, so it fails fast."""
    folder = Path(args.compare_nanogpt)
    if not (folder / "bench.py").is_file() or not (folder / "configurator.py").is_file():
        what = "is not a folder" if not folder.is_dir() else "has no bench.py/configurator.py"
        raise NotFoundError(f"--compare_nanogpt {folder} {what}; {NANOGPT_CLONE}")
    sizes = PRESETS.get(args.preset, TINY)
    if sizes != NANOGPT_SIZES:
        raise InputError(
            f"--compare_nanogpt needs --preset gpt2: nanoGPT's bench.py hard-codes GPT-2 124M "
            f"({NANOGPT_SIZES}), not --preset {args.preset} ({sizes})")
    if args.tokens == "text":
        raise InputError("--compare_nanogpt runs nanoGPT with real_data=False (random ids); "
                         "use --tokens random, or leave --tokens out")
    return folder


def nanogpt_command(batch_size: int, cfg: GPTConfig) -> list[str]:
    """nanoGPT's bench.py at our settings, as its configurator's ``--key=value`` overrides
    (each type must match its default there: ints, bools, strings)."""
    return [sys.executable, "bench.py", f"--batch_size={batch_size}",
            f"--block_size={cfg.block_size}", f"--bias={cfg.bias}", "--real_data=False",
            f"--dtype={cfg.dtype}", "--device=cuda", "--compile=True", "--profile=False"]


def parse_nanogpt_output(text: str) -> dict[str, Any]:
    """ms/step, nanoGPT's own MFU and losses from nanoGPT bench.py's stdout.

    It prints one loss per step (``k/10 loss: x`` for its 10 burn-in steps, then
    ``k/20 loss: x`` for the 20 timed ones) and, once, ``time per iteration: Xms, MFU:
    Y%``: the mean over the timed steps (its only timing; there are no per-step times).
    Its MFU is against an A100's 312 TFLOP/s and its own FLOP count (padded vocabulary).
    """
    times = _NANOGPT_TIME.findall(text)
    if not times:
        raise ValueError("no 'time per iteration: ...ms, MFU: ...%' line in nanoGPT's output")
    ms, mfu = times[-1]
    losses = [float(x) for x in _NANOGPT_LOSS.findall(text)]
    params = _NANOGPT_PARAMS.search(text)
    return {"ms_per_step": float(ms), "mfu_a100_own": float(mfu) / 100,
            "first_loss": losses[0] if losses else float("nan"),
            "last_loss": losses[-1] if losses else float("nan"),
            "nanogpt_params_m": float(params.group(1)) if params else None}


def _failure_hint(output: str) -> str:
    """The likely fix for a failed nanoGPT run, read off its output."""
    if "No module named 'torch'" in output:
        return f"it needs PyTorch with CUDA in this interpreter ({sys.executable})"
    if "out of memory" in output.lower():
        return ("the GPU ran out of memory (this process keeps its own peak); try a smaller "
                "--batch_size or fewer --variants")
    if "CUDA" in output and ("not compiled" in output or "driver" in output.lower()):
        return "it needs a CUDA GPU visible to PyTorch"
    return "run the command above by hand to see why"


def run_nanogpt(folder: Path, batch_size: int, cfg: GPTConfig) -> dict[str, Any]:
    """One run of nanoGPT's bench.py as a row like ours. cwd is its folder: it reads
    ``configurator.py`` and imports ``model`` from there."""
    command = nanogpt_command(batch_size, cfg)
    print(f"nanoGPT: cd {folder} && python {' '.join(command[1:])}", flush=True)
    proc = subprocess.run(command, cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
    tail = "\n".join(proc.stdout.strip().splitlines()[-15:])
    if proc.returncode != 0:
        raise NanoGPTError(f"nanoGPT's bench.py exited with {proc.returncode}: "
                           f"{_failure_hint(proc.stdout)}. Its output ended:\n{tail}")
    try:
        result = parse_nanogpt_output(proc.stdout)
    except ValueError as err:
        raise NanoGPTError(f"{err} (has {folder}/bench.py changed?). Its output ended:\n{tail}")
    seconds = result["ms_per_step"] / 1e3
    return {**result, "tokens_per_sec": batch_size * cfg.block_size / seconds,
            "command": command[1:]}


def _measure_ours(args: argparse.Namespace, base: GPTConfig, batch: int,
                  repeat: int) -> list[dict]:
    """Each variant once at this batch size; caches cleared after each, so the next
    variant's compile and memory start from nothing."""
    samples = []
    for name in args.variants.split(","):
        cfg = dataclasses.replace(base, **VARIANTS[name])
        if args.compare_nanogpt:
            result = _bench_in_child(cfg, batch, args)
        else:
            result = bench_variant(cfg, batch, args.steps, args.warmup, args.tokens)
            jax.clear_caches()
        samples.append({"program": "jaxgpt2", "variant": name, "batch_size": batch,
                        "repeat": repeat, **result})
    return samples


def _bench_in_child(cfg: GPTConfig, batch: int, args: argparse.Namespace) -> dict[str, Any]:
    """``bench_variant`` in a process of its own: JAX's allocator keeps the GPU memory it
    took until its process ends, and nanoGPT's run, next, needs that memory."""
    spec = {"cfg": dataclasses.asdict(cfg), "batch": batch, "steps": args.steps,
            "warmup": args.warmup, "tokens": args.tokens}
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        raise UserError(f"measuring {cfg} at batch {batch} failed: " + proc.stdout[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(args: argparse.Namespace, base: GPTConfig, folder: Path | None) -> list[dict]:
    """Every measurement in the order taken: per batch size and repeat, ours (each variant)
    and nanoGPT's, the two alternating which goes first, so slow drift (clocks, heat,
    neighbours) hits both programs alike."""
    nano_cfg = dataclasses.replace(base, dtype=resolve_auto(base, jax.default_backend()).dtype)
    samples = []
    for batch in args.batch_size:
        for repeat in range(args.repeats):
            nano_first = folder is not None and repeat % 2 == 1
            if not nano_first:
                samples += _measure_ours(args, base, batch, repeat)
            if folder is not None:
                samples.append({"program": "nanoGPT", "variant": NANOGPT_ROW,
                                "batch_size": batch, "repeat": repeat,
                                **run_nanogpt(folder, batch, nano_cfg)})
            if nano_first:
                samples += _measure_ours(args, base, batch, repeat)
    return samples


def summarize(samples: list[dict], base: GPTConfig, peak_tflops: float) -> list[dict]:
    """One row per (program, variant, batch size): the median ms/step over the repeats
    (tokens/s and MFU follow from it), the largest peak memory, the median compile time."""
    groups: dict[tuple, list[dict]] = {}
    for s in samples:
        groups.setdefault((s["program"], s["variant"], s["batch_size"]), []).append(s)
    rows = []
    for (program, variant, batch), group in groups.items():
        ms = statistics.median(g["ms_per_step"] for g in group)
        tokens_per_sec = batch * base.block_size / (ms / 1e3)
        row = {k: v for k, v in group[0].items() if k != "repeat"}
        row.update(bias=base.bias, ms_per_step=ms, tokens_per_sec=tokens_per_sec,
                   mfu=tokens_per_sec * flops_per_token(base) / (peak_tflops * 1e12),
                   repeats_ms_per_step=[g["ms_per_step"] for g in group])
        if program == "jaxgpt2":
            row.update(peak_gib=max(g["peak_gib"] for g in group),
                       compile_s=statistics.median(g["compile_s"] for g in group))
        rows.append(row)
    return rows


def compare(rows: list[dict]) -> tuple[list[dict], dict | None]:
    """Ours/nanoGPT tokens per second per (variant, batch size, bias), and each program's
    best batch against the other's (the fair question when their best batches differ)."""
    nano = {r["batch_size"]: r for r in rows if r["program"] == "nanoGPT"}
    ours = [r for r in rows if r["program"] == "jaxgpt2"]
    ratios = [{"variant": r["variant"], "batch_size": r["batch_size"], "bias": r["bias"],
               "ours_tokens_per_sec": r["tokens_per_sec"],
               "nanogpt_tokens_per_sec": nano[r["batch_size"]]["tokens_per_sec"],
               "ratio": r["tokens_per_sec"] / nano[r["batch_size"]]["tokens_per_sec"]}
              for r in ours if r["batch_size"] in nano]
    if not nano:
        return ratios, None
    best_ours = max(ours, key=lambda r: r["tokens_per_sec"])
    best_nano = max(nano.values(), key=lambda r: r["tokens_per_sec"])
    return ratios, {"ours_variant": best_ours["variant"], "ours_batch": best_ours["batch_size"],
                    "ours_tokens_per_sec": best_ours["tokens_per_sec"],
                    "nanogpt_batch": best_nano["batch_size"],
                    "nanogpt_tokens_per_sec": best_nano["tokens_per_sec"],
                    "ratio": best_ours["tokens_per_sec"] / best_nano["tokens_per_sec"]}


def print_table(rows: list[dict], args: argparse.Namespace, base: GPTConfig) -> None:
    """The results table: one line per (program, variant, batch size)."""
    sizes = ",".join(map(str, args.batch_size))
    median = f", median of {args.repeats}" if args.repeats > 1 else ""
    print(f"\n{args.preset}, batch {sizes} x {args.block_size}, {args.tokens} tokens, "
          f"bias {base.bias}, {jax.devices()[0].device_kind}, jax {jax.__version__}{median}")
    print(f"{'variant':<34}{'batch':>6}{'bias':>6}{'ms/step':>9}{'tokens/s':>12}{'MFU':>7}"
          f"{'peak GiB':>10}{'compile s':>11}{'loss@1':>9}")
    for r in rows:
        ours = r["program"] == "jaxgpt2"
        peak = f"{r['peak_gib']:>10.1f}{r['compile_s']:>11.1f}" if ours else " " * 21
        print(f"{r['variant']:<34}{r['batch_size']:>6}{str(r['bias']):>6}{r['ms_per_step']:>9.1f}"
              f"{r['tokens_per_sec']:>12,.0f}{r['mfu']:>7.1%}{peak}{r['first_loss']:>9.4f}")


def print_comparison(ratios: list[dict], best: dict | None) -> None:
    """The short table of ours/nanoGPT tokens per second, then the best batch of each."""
    print(f"\n{'ours / nanoGPT tokens/s':<34}{'batch':>6}{'bias':>6}{'ours':>12}{'nanoGPT':>12}"
          f"{'ratio':>8}")
    for r in ratios:
        print(f"{r['variant']:<34}{r['batch_size']:>6}{str(r['bias']):>6}"
              f"{r['ours_tokens_per_sec']:>12,.0f}{r['nanogpt_tokens_per_sec']:>12,.0f}"
              f"{r['ratio']:>7.3f}x")
    if best:
        print(f"best batch of each: ours {best['ours_variant']} @ {best['ours_batch']} "
              f"{best['ours_tokens_per_sec']:,.0f} / nanoGPT @ {best['nanogpt_batch']} "
              f"{best['nanogpt_tokens_per_sec']:,.0f} = {best['ratio']:.3f}x")


def check_args(args: argparse.Namespace) -> Path | None:
    """Refuse bad settings before any measurement; with ``--compare_nanogpt``, force random
    ids (said on stdout) and turn JAX's preallocation off so PyTorch has room."""
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        raise InputError(f"unknown --variants {','.join(unknown)} "
                         f"(choose from {', '.join(VARIANTS)})")
    if min(args.repeats, args.steps) < 1:
        raise InputError("--repeats and --steps must be at least 1")
    if not args.compare_nanogpt:
        args.tokens = args.tokens or "text"
        return None
    folder = check_nanogpt(args)
    if args.tokens is None:
        print("tokens: random (forced by --compare_nanogpt: nanoGPT's real_data=False draws "
              "random ids)")
    args.tokens = "random"
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    print(f"XLA_PYTHON_CLIENT_PREALLOCATE={os.environ['XLA_PYTHON_CLIENT_PREALLOCATE']} "
          "(nanoGPT's PyTorch needs the GPU memory this process does not use)")
    return folder


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Measure, print, and return (and with ``--json`` write) every row."""
    args = build_parser().parse_args(argv)
    if args.child:  # one variant for a comparing parent (_bench_in_child)
        spec = json.loads(args.child)
        result = bench_variant(GPTConfig(**spec["cfg"]), spec["batch"], spec["steps"],
                               spec["warmup"], spec["tokens"])
        print(json.dumps(result))
        return result
    folder = check_args(args)
    base = base_config(args)
    samples = measure(args, base, folder)
    rows = summarize(samples, base, args.peak_tflops)
    print_table(rows, args, base)
    ratios, best = compare(rows)
    if folder is not None:
        print_comparison(ratios, best)
    single = len(args.batch_size) == 1
    report = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "args": vars(args),
              "rows": rows, "ratios": ratios, "best": best, "samples": samples,
              # keyed by variant (variant@batch for several batch sizes), as before the rows
              "results": {r["variant"] if single else f"{r['variant']}@{r['batch_size']}": r
                          for r in rows if r["program"] == "jaxgpt2"}}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: 0, or 1 after one ``error: ...`` line for a fixable problem."""
    return report_errors(lambda: run(argv))


if __name__ == "__main__":
    sys.exit(main())
