"""Regenerate the Hugging Face GPT-2 golden fixtures in tests/golden/ (needs torch).

    /work/hfvenv/bin/python tests/make_golden.py      # or any venv with torch + transformers

The fixtures were made with torch 2.13.0 (CPU) and transformers 5.24.0 (the versions are
also stored in each golden.npz and config.json). This script is NOT run by the test
suite: tests/test_hf.py reads only the files it writes and needs neither torch nor
network access.

For each model below it builds a ``transformers.GPT2LMHeadModel`` with the real GPT-2
vocabulary size (50257, so ``wte`` needs padding to 50304 in jaxgpt2), fills *every*
parameter with seeded noise at scales that make the function non-trivial (HF's default
init leaves biases at 0 and LayerNorm at 1/0, which would not test their mapping, and its
0.02 std keeps GELU and softmax nearly linear), and writes into ``tests/golden/<name>/``:

* ``config.json`` + ``model.safetensors`` (+ ``generation_config.json``): exactly what
  ``GPT2LMHeadModel.save_pretrained`` writes. n_embd is tiny (8 and 16) because
  50257 x n_embd float32 dominates the size: 1.6 MB and 3.2 MB;
* ``golden.npz``: inputs and HF's float32 outputs for three batches of the same token
  ids, ``full`` (no padding), ``right`` (right-padded) and ``left`` (left-padded); each
  with ``{v}_input_ids``, ``{v}_attention_mask`` and, from a forward pass with *no*
  ``position_ids`` (so HF uses positions 0..T-1 whatever the mask, as jaxgpt2 does):

  - ``{v}_hidden``: the final-LayerNorm output (B, T, n_embd);
  - ``{v}_logits_cols``: logits at the vocabulary columns ``logit_cols`` (B, T, K). Full
    float32 logits would be B*T*50257*4 bytes per batch, too large to commit, so the
    test checks all columns via ``{v}_hidden`` @ wte.T, ``{v}_logsumexp`` (log of the
    softmax normaliser over the full vocabulary, computed in float64) and
    ``{v}_argmax``, and checks HF's own logit values at these columns;

  plus ``gen_prompt`` / ``gen_output``: HF greedy ``generate`` (do_sample=False,
  pad_token_id=50256, eos disabled so every row gets ``gen_new_tokens`` tokens), and
  ``gen_margin``, the smallest top-1 minus top-2 logit gap over the generated steps, so a
  greedy mismatch can be told apart from a near tie.

The script is deterministic: seeded torch generators, one thread, deterministic
algorithms, and a zip writer with fixed timestamps, so rerunning it with the same
versions rewrites byte-identical files (it prints their sha256).
"""

from __future__ import annotations

import hashlib
import io
import shutil
import sys
import zipfile
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel

GOLDEN = Path(__file__).resolve().parent / "golden"
VOCAB = 50257
EOT = 50256  # <|endoftext|>, GPT-2's pad token by convention

MODELS = {
    # name: (GPT2Config kwargs, seed)
    "l2_h2_e16_p64": (dict(n_layer=2, n_head=2, n_embd=16, n_positions=64), 0),
    "l3_h4_e8_p32": (dict(n_layer=3, n_head=4, n_embd=8, n_positions=32), 1),
}
BATCH, SEQ = 3, 16
RIGHT_LENGTHS = (16, 11, 5)
LEFT_LENGTHS = (16, 9, 4)
GEN_PROMPT_LEN, GEN_NEW_TOKENS = 8, 16
N_RANDOM_COLS = 192
MAX_FILE_BYTES = 4 * 1024 * 1024


def randomize(model: GPT2LMHeadModel, seed: int) -> None:
    """Overwrite every parameter with seeded noise (see the module docstring for why)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():  # lm_head is tied: not listed separately
            if name.endswith(("wte.weight", "wpe.weight")):
                new = 0.5 * torch.randn(p.shape, generator=g)
            elif name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                new = 1.0 + 0.2 * torch.randn(p.shape, generator=g)
            elif p.ndim == 2:  # Conv1D weight, (in, out)
                new = torch.randn(p.shape, generator=g) / p.shape[0] ** 0.5
            else:  # biases of Conv1D and LayerNorm
                new = 0.1 * torch.randn(p.shape, generator=g)
            p.copy_(new)


def token_ids(rng: np.random.Generator, rows: int, length: int) -> np.ndarray:
    """Ids over the whole vocabulary, including both ends and <|endoftext|>."""
    ids = rng.integers(0, VOCAB, size=(rows, length), dtype=np.int64)
    ids[0, :4] = [0, EOT, VOCAB // 2, 50255]
    ids[1, 2] = EOT
    ids[2, 1] = 1
    return ids


def padded(ids: np.ndarray, lengths: tuple[int, ...], side: str) -> tuple[np.ndarray, np.ndarray]:
    out = np.full_like(ids, EOT)
    mask = np.zeros_like(ids)
    for r, n in enumerate(lengths):
        if side == "right":
            out[r, :n], mask[r, :n] = ids[r, :n], 1
        else:
            out[r, -n:], mask[r, -n:] = ids[r, :n], 1
    return out, mask


@torch.no_grad()
def forward(model: GPT2LMHeadModel, ids: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
    # No position_ids on purpose: HF then uses arange(T) for every row, like jaxgpt2.
    out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                output_hidden_states=True, use_cache=False)
    logits = out.logits.numpy()
    assert logits.dtype == np.float32 and logits.shape[-1] == VOCAB
    return {"hidden": out.hidden_states[-1].numpy(), "logits": logits}


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """``np.savez`` with fixed zip timestamps, so the bytes are reproducible."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for key in sorted(arrays):
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.asarray(arrays[key], order="C"), allow_pickle=False)
            zf.writestr(zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0)),
                        buf.getvalue())


def make(name: str, shape: dict, seed: int) -> None:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB, activation_function="gelu_new",
                        layer_norm_epsilon=1e-5, attn_pdrop=0.0, embd_pdrop=0.0,
                        resid_pdrop=0.0, **shape)
    model = GPT2LMHeadModel(config).eval()
    model.set_attn_implementation("eager")  # the reference math; sdpa is checked against it
    randomize(model, seed)
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()

    folder = GOLDEN / name
    if folder.exists():
        shutil.rmtree(folder)
    model.save_pretrained(folder)

    rng = np.random.default_rng(seed)
    ids = token_ids(rng, BATCH, SEQ)
    batches = {"full": (ids, np.ones_like(ids)),
               "right": padded(ids, RIGHT_LENGTHS, "right"),
               "left": padded(ids, LEFT_LENGTHS, "left")}

    cols = set(range(4)) | set(range(VOCAB - 4, VOCAB)) | {VOCAB // 2}
    cols |= set(int(i) for i in ids.ravel())
    cols |= set(rng.choice(VOCAB, N_RANDOM_COLS, replace=False).tolist())
    cols = np.array(sorted(cols), np.int64)

    sdpa = GPT2LMHeadModel(config).eval()
    sdpa.load_state_dict(model.state_dict())
    sdpa.set_attn_implementation("sdpa")
    arrays: dict[str, np.ndarray] = {"logit_cols": cols.astype(np.int32)}
    for v, (x, m) in batches.items():
        out = forward(model, x, m)
        real = m.astype(bool)
        # Sanity: HF's two attention paths agree on the real positions.
        other = forward(sdpa, x, m)["logits"]
        np.testing.assert_allclose(other[real], out["logits"][real], rtol=0, atol=1e-4)
        if v == "right":  # causal: right padding never changes the real positions
            ref = forward(model, ids, np.ones_like(ids))["logits"]
            for r, n in enumerate(RIGHT_LENGTHS):
                np.testing.assert_allclose(out["logits"][r, :n], ref[r, :n], atol=1e-4)
        logits64 = out["logits"].astype(np.float64)
        top = logits64.max(-1, keepdims=True)
        arrays.update({
            f"{v}_input_ids": x.astype(np.int32),
            f"{v}_attention_mask": m.astype(np.int32),
            f"{v}_hidden": out["hidden"].astype(np.float32),
            f"{v}_logits_cols": out["logits"][..., cols],
            f"{v}_logsumexp": (top[..., 0] + np.log(np.exp(logits64 - top).sum(-1))
                               ).astype(np.float32),
            f"{v}_argmax": out["logits"].argmax(-1).astype(np.int32),
        })

    prompt = rng.integers(0, VOCAB, size=(2, GEN_PROMPT_LEN), dtype=np.int64)
    prompt[1, 0] = EOT  # a document boundary, as GPT-2 prompts often start
    gen_config = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=GEN_NEW_TOKENS,
                                  pad_token_id=EOT, eos_token_id=None, bos_token_id=None)
    with torch.no_grad():
        gen = model.generate(torch.from_numpy(prompt), attention_mask=torch.ones_like(
            torch.from_numpy(prompt)), generation_config=gen_config).numpy()
    assert gen.shape == (2, GEN_PROMPT_LEN + GEN_NEW_TOKENS), gen.shape
    assert (gen[:, :GEN_PROMPT_LEN] == prompt).all()
    # Greedy from a full (uncached) forward must pick the same tokens; record the margin.
    full = forward(model, gen, np.ones_like(gen))["logits"][:, GEN_PROMPT_LEN - 1:-1]
    assert (full.argmax(-1) == gen[:, GEN_PROMPT_LEN:]).all(), "cached vs full greedy differ"
    top2 = np.sort(full, axis=-1)[..., -2:]
    margin = float((top2[..., 1] - top2[..., 0]).min())
    assert margin > 1e-3, f"{name}: greedy near-tie (margin {margin}); pick another seed"
    arrays.update({"gen_prompt": prompt.astype(np.int32), "gen_output": gen.astype(np.int32),
                   "gen_new_tokens": np.array(GEN_NEW_TOKENS, np.int32),
                   "gen_margin": np.array(margin, np.float32),
                   "torch_version": np.array(torch.__version__),
                   "transformers_version": np.array(transformers.__version__)})
    write_npz(folder / "golden.npz", arrays)

    for file in sorted(folder.iterdir()):
        size = file.stat().st_size
        assert size < MAX_FILE_BYTES, f"{file} is {size} bytes; fixtures must stay < 4 MB"
        digest = hashlib.sha256(file.read_bytes()).hexdigest()[:16]
        print(f"{file.relative_to(GOLDEN.parent)}  {size:>9,d} B  sha256 {digest}")
    print(f"  greedy margin {margin:.4f}")


def main() -> None:
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, "
          f"python {sys.version.split()[0]}")
    for name, (shape, seed) in MODELS.items():
        make(name, shape, seed)
    total = sum(f.stat().st_size for f in GOLDEN.rglob("*") if f.is_file())
    print(f"total {total:,d} B")


if __name__ == "__main__":
    main()
