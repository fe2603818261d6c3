"""GPU parity against Hugging Face: ``python tests/gpu_parity.py`` on a CUDA machine.

Not collected by pytest (CI has no GPU and no torch). Builds a randomly initialised
``transformers.GPT2LMHeadModel`` of GPT-2 124M's shape, saves it, loads it with
``jaxgpt2.hf.load_pretrained`` and compares logits on real positions (unpadded and
right-padded) for each attention path and compute dtype. The reference is HF in float32
on the CPU. Prints one line per case: relative error ||ours - HF|| / ||HF|| and the max.
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile

import jax
import numpy as np
import torch
import transformers

from jaxgpt2.hf import load_pretrained
from jaxgpt2.model import GPT


def build_hf_model(path: str) -> transformers.GPT2LMHeadModel:
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=12, n_head=12, n_embd=768, n_positions=1024, vocab_size=50257,
        resid_pdrop=0, embd_pdrop=0, attn_pdrop=0))
    with torch.no_grad():  # non-trivial biases and LayerNorm parameters
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.normal_(0.0 if name.endswith("bias") else 1.0, 0.1)
    model.save_pretrained(path)
    return model.eval()


def main() -> int:
    rng = np.random.default_rng(0)
    B, T = 4, 256
    ids = rng.integers(0, 50257, (B, T)).astype(np.int32)
    padded = np.ones((B, T), np.int32)
    padded[1, 200:] = 0
    padded[3, 17:] = 0
    masks = {"unpadded": np.ones_like(padded), "right-padded": padded}
    with tempfile.TemporaryDirectory() as path:
        hf = build_hf_model(path)
        with torch.no_grad():
            refs = {k: hf(torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(m).long())
                    .logits.float().numpy() for k, m in masks.items()}
        config, params = load_pretrained(path)
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}, "
          f"transformers {transformers.__version__}")
    failures = 0
    cases = [("float32", "xla", 1e-5), ("float32", "cudnn", 1e-5),
             ("bfloat16", "xla", 3e-2), ("bfloat16", "cudnn", 3e-2),
             ("float16", "xla", 1e-2), ("float16", "cudnn", 1e-2)]
    for dtype, attention, tol in cases:
        model = GPT(dataclasses.replace(config, dtype=dtype, attention=attention))
        fn = jax.jit(lambda p, i, m: model.apply({"params": p}, i, m))
        for label, mask in masks.items():
            real = mask.astype(bool)
            try:
                with jax.default_matmul_precision("highest" if dtype == "float32" else "default"):
                    ours = np.asarray(fn(params, ids, mask))
            except Exception as err:  # cuDNN refuses unsupported dtypes/shapes
                print(f"{dtype:9} {attention:6} {label:13} not supported: {type(err).__name__}: "
                      f"{str(err).splitlines()[0][:150]}")
                continue
            diff = ours[real] - refs[label][real]
            rel = np.linalg.norm(diff) / np.linalg.norm(refs[label][real])
            ok = rel < tol
            failures += not ok
            print(f"{dtype:9} {attention:6} {label:13} rel {rel:.2e} max|d| "
                  f"{np.abs(diff).max():.2e} {'ok' if ok else 'FAIL'} (tol {tol:g})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
