"""Where the GPU train step's time goes: GPT-2 124M under ``jax.profiler``, kernels grouped.

    python docs/gpu_step_profile.py [--batch_size 32] [--no-bias] [--kernels auto|xla|pallas]
                                    [--steps 10] [--out DIR]

Every GPU kernel of the profiled steps is matched to the HLO instruction that launched
it (XLA names a fusion's kernel after the fusion) and grouped by what it computes:
matmuls, attention (cuDNN), layer norms, GELU, the loss, the optimizer, other
elementwise work, each split into forward and backward; the fused Pallas kernels
(``model.kernels``) by their own names. Prints ms per step per group,
the busiest kernels, and the step's wall time, so the distance to a target can be read
off piece by piece.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import re
import time

import jax
import numpy as np

from jaxgpt2.config import PRESETS, GPTConfig, OptimConfig
from jaxgpt2.model import GPT
from jaxgpt2.optim import build_optimizer
from jaxgpt2.step import create_train_state, jit_train_step, make_train_step

MATMUL = re.compile(r"gemm|nvjet|cutlass|xmma|cublas|sm90_|triton_gemm", re.I)
ATTENTION = re.compile(r"cudnn|fmha|flash|sdpa", re.I)
PALLAS = re.compile(r"(layer_norm|bias_gelu)_(forward|backward)|cross_entropy")
GROUPS = [("layer norm", re.compile(r"/ln_[12f]/|ln_f")),
          ("loss", re.compile(r"loss\.token_nll|head_nll|logsumexp|_masked_f32")),
          ("GELU", re.compile(r"/mlp/(c_fc/)?(tanh|mul|add|integer_pow|sub|bias_gelu)")),
          ("attention (elementwise)", re.compile(r"/attn/")),
          ("embeddings", re.compile(r"wte|wpe|_embed")),
          ("residual and other model", re.compile(r"token_nll|hidden_states"))]


def profile(batch_size: int, bias: bool, kernels: str, steps: int,
            trace_dir: str) -> tuple[float, str]:
    """Compile GPT-2 124M's train step, time ``steps`` steps, then profile as many; returns
    ms per step and the optimized HLO text."""
    gpt = GPTConfig(**PRESETS["gpt2"], vocab_size=50257, block_size=1024, bias=bias,
                    dtype="bfloat16", scan_layers=False, kernels=kernels)
    model = GPT(gpt)
    optimizer = build_optimizer(OptimConfig(), 1000)
    state = create_train_state(model.init_params(jax.random.PRNGKey(0)), optimizer, 0)
    ids = np.random.default_rng(0).integers(0, 50257, (1, batch_size, 1025)).astype(np.int32)
    batch = jax.device_put({"input_ids": ids[..., :-1], "targets": ids[..., 1:],
                            "loss_mask": np.ones((1, batch_size, 1024), np.float32)})
    step = jit_train_step(make_train_step(model, optimizer)).lower(state, batch).compile()
    for _ in range(3):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    began = time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    ms = (time.perf_counter() - began) / steps * 1e3
    jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
    for _ in range(steps):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    jax.profiler.stop_trace()
    return ms, step.as_text()


def instruction_names(hlo: str) -> dict[str, str]:
    """Kernel-style name (dots as underscores) -> op_name metadata, for every instruction."""
    names = {}
    for line in hlo.splitlines():
        m = re.match(r"\s*(?:ROOT )?%(\S+) = ", line)
        if m:
            op = re.search(r'op_name="([^"]+)"', line)
            names[m.group(1).replace(".", "_")] = op.group(1) if op else ""
    return names


def classify(kernel: str, op_name: str) -> str:
    """The group of one kernel, from its own name (library kernels) or its HLO origin."""
    direction = "bwd" if "transpose(jvp" in op_name else "fwd"
    if pallas := PALLAS.search(kernel):
        return f"Pallas {pallas.group(0)}"
    if ATTENTION.search(kernel):
        backward = re.search(r"bprop|bwd|dq|dot_do_o", kernel, re.I)
        return f"attention cuDNN {'bwd' if backward else 'fwd'}"
    if MATMUL.search(kernel) or "dot_general" in op_name and "fusion" not in kernel:
        return "matmuls (cuBLAS/Triton, fwd and bwd)"  # library kernels name no HLO origin
    if not op_name:
        return "unmatched"
    if "token_nll" not in op_name:
        return "optimizer, clipping, metrics"
    for group, pattern in GROUPS:
        if pattern.search(op_name):
            return f"{group} {direction}"
    return f"other {direction}"


def gpu_events(trace_dir: str) -> list[dict]:
    """Complete events on the GPU's processes of the perfetto trace."""
    path = sorted(glob.glob(f"{trace_dir}/**/*perfetto_trace.json.gz", recursive=True))[-1]
    trace = json.load(gzip.open(path))
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    gpu_pids = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
                and "gpu" in str(e.get("args", {}).get("name", "")).lower()}
    return [e for e in events if e.get("ph") == "X" and e.get("pid") in gpu_pids]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--bias", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--kernels", default="auto", choices=("auto", "xla", "pallas"))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", default="/tmp/gpu_step_profile")
    args = parser.parse_args()
    ms, hlo = profile(args.batch_size, args.bias, args.kernels, args.steps, args.out)
    names = instruction_names(hlo)
    groups, kernels = collections.Counter(), collections.Counter()
    for e in gpu_events(args.out):
        base = re.sub(r"^(void )?", "", e["name"]).split("(")[0]
        op_name = names.get(base, names.get(re.sub(r"_\d+$", "", base), ""))
        groups[classify(base, op_name)] += e["dur"]
        kernels[base] += e["dur"]
    per_step = lambda us: us / args.steps / 1e3
    print(f"GPT-2 124M, batch {args.batch_size} x 1024, bias={args.bias}, "
          f"kernels={args.kernels}: {ms:.1f} ms/step wall, "
          f"{per_step(sum(groups.values())):.1f} ms/step of GPU kernels")
    print("| group | ms/step |\n|---|---|")
    for group, us in groups.most_common():
        print(f"| {group} | {per_step(us):.2f} |")
    print("\nbusiest kernels (ms/step):")
    for kernel, us in kernels.most_common(25):
        print(f"  {per_step(us):6.2f}  {kernel[:90]}  [{names.get(kernel, '')[-60:]}]")


if __name__ == "__main__":
    main()
