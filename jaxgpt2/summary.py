"""What a run prints before it trains: devices, model size and cost, memory, batch, plan.

FLOPs per token follow the PaLM paper's appendix B, as nanoGPT's ``estimate_mfu`` does:
``6 N + 12 L T C``, with N the parameters without position embeddings (the tied token
embedding counts once: it is also the output matmul), L layers, T the context length and
C the width. The second term is attention's score and value products.
"""

from __future__ import annotations

from typing import Any

import jax

from jaxgpt2.config import Config, GPTConfig

# Dense bf16 peak FLOP/s per device (datasheets, without sparsity), by device_kind prefix;
# model FLOPs utilisation is reported only where the peak is known.
PEAK_FLOPS = {"NVIDIA H100": 989e12, "NVIDIA H200": 989e12, "NVIDIA A100": 312e12,
              "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5p": 459e12}


def parameter_counts(gpt: GPTConfig) -> dict[str, int]:
    """``total`` (the real vocabulary, not its padding; tied head counted once) and
    ``non_embedding`` (without the token and position embeddings)."""
    C, bias = gpt.n_embd, int(gpt.bias)
    norm = C + bias * C
    block = 2 * norm + (3 * C * C + bias * 3 * C) + (C * C + bias * C) \
        + (4 * C * C + bias * 4 * C) + (4 * C * C + bias * C)
    non_embedding = gpt.n_layer * block + norm
    return {"total": non_embedding + (gpt.vocab_size + gpt.block_size) * C,
            "non_embedding": non_embedding}


def flops_per_token(gpt: GPTConfig) -> float:
    """Training FLOPs per token, forward and backward (see the module docstring)."""
    n = parameter_counts(gpt)["total"] - gpt.block_size * gpt.n_embd
    return 6 * n + 12 * gpt.n_layer * gpt.block_size * gpt.n_embd


def peak_flops(devices: list[jax.Device]) -> float | None:
    """The devices' summed peak FLOP/s, or None for a device not in ``PEAK_FLOPS``."""
    kind = devices[0].device_kind
    peak = next((v for k, v in PEAK_FLOPS.items() if kind.startswith(k)), None)
    return peak * len(devices) if peak else None


def size_text(n: float) -> str:
    """Bytes for a reader: GiB from 128 MiB up, MiB below."""
    return f"{n / 2**30:.2f} GiB" if n >= 2**27 else f"{n / 2**20:.1f} MiB"


def startup_lines(config: Config, gpt: GPTConfig, devices: list[jax.Device],
                  mesh: jax.sharding.Mesh, state: Any) -> list[str]:
    """What the run is about to do: devices, model, optimizer, batch and plan."""
    tc, dc, oc = config.train, config.data, config.optim
    n_dev, device = len(devices), devices[0]
    counts = parameter_counts(gpt)
    tokens = dc.batch_size * tc.grad_accum * gpt.block_size
    state_bytes = {k: sum(x.nbytes for x in jax.tree.leaves(getattr(state, k)))
                   for k in ("params", "opt_state")}
    return [
        f"devices: {n_dev} x {device.device_kind} ({device.platform}); mesh "
        f"{dict(mesh.shape)}; processes: {jax.process_count()}",
        f"model: {counts['total']:,} parameters ({counts['non_embedding']:,} without "
        f"embeddings), {gpt.n_layer} layers, {gpt.n_embd} wide, context {gpt.block_size}; "
        f"{flops_per_token(gpt) / 1e6:,.1f} MFLOPs/token (6N + 12LTC); compute {gpt.dtype}, "
        f"attention {gpt.attention}, remat {gpt.remat}",
        f"optimizer: {oc.name}, schedule {oc.schedule}; state in memory: parameters "
        f"{size_text(state_bytes['params'])} + optimizer {size_text(state_bytes['opt_state'])} "
        "(float32, all devices)",
        f"batch: global {dc.batch_size * tc.grad_accum} = micro-batch {dc.batch_size // n_dev} "
        f"per device x {n_dev} devices x {tc.grad_accum} accumulation; {tokens:,} tokens/step; "
        f"{tc.max_steps:,} steps = {tokens * tc.max_steps:,} tokens",
        f"outputs: {tc.out_dir} (checkpoints/, metrics.jsonl, config.yaml)",
    ]


def memory_line(memory: Any, gpt: GPTConfig, config: Config) -> str:
    """One device's memory for the compiled train step (XLA's ``memory_analysis()``)."""
    per_device = config.data.batch_size // max(1, jax.device_count())
    return (f"memory per device (XLA): arguments {size_text(memory.argument_size_in_bytes)}, "
            f"activations and workspace {size_text(memory.temp_size_in_bytes)} at micro-batch "
            f"{per_device}, remat {gpt.remat}")
