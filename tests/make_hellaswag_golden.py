"""Regenerate the HellaSwag golden fixtures in tests/golden/hellaswag/ (needs torch).

    /work/hfvenv/bin/python tests/make_hellaswag_golden.py   # any venv with torch + transformers

NOT run by the test suite: tests/test_hellaswag.py reads only what this writes.

It writes ``items.jsonl``: 12 HellaSwag-format lines of our own making (seeded; the
published fields, of which jaxgpt2 reads ``ctx``, ``endings`` and ``label``), with
contexts and endings of varied lengths, non-ASCII text, and two examples (five rows)
longer than the model's 64 positions. Then, with ``transformers``' ``GPT2LMHeadModel`` loaded from
``tests/golden/l2_h2_e16_p64`` (a random GPT-2, see make_golden.py) in float64, it
scores them with its own code, written after build-nanogpt's ``hellaswag.py``
(``render_example`` and the loss in ``evaluate``): rows ``enc.encode(ctx) +
enc.encode(" " + ending)`` with tiktoken's own ``r50k_base`` (GPT-2's ranks, read
through tiktoken's hash-checked cache from jaxgpt2/assets, so no network), torch
cross-entropy of each position's next token, summed where the shifted mask marks the
ending; ``acc`` by argmin of the sums, ``acc_norm`` of sum / ending tokens. A row longer
than 64 tokens keeps its last 64 (jaxgpt2's documented rule; HF has no more positions).

``golden.json`` holds the per-example per-ending summed losses and token counts, the
predictions, acc, acc_norm and n, and two checks of its own: the smallest gap between
the best and second-best ending (so float32 cannot flip a prediction) and the largest
difference of HF's own float32 losses from float64 (what float32 costs).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import tiktoken
import torch
import torch.nn.functional as F
import transformers
from transformers import GPT2LMHeadModel

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "tests/golden/l2_h2_e16_p64"
OUT = ROOT / "tests/golden/hellaswag"
R50K_URL = "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken"
SEED = 0
N_ITEMS = 12
MIN_MARGIN = 1e-3  # relative gap between the best two endings that float32 cannot close

WORDS = ("the man woman dog child water ball kitchen slowly quickly then he she they it is "
         "are was runs jumps picks puts holds cuts paints rides throws into onto over under "
         "with a an of to and but red small large wooden bright camera rope ladder bike "
         "pool knife brush guitar snow lake").split()
SPECIAL = [  # hand-written: punctuation, digits, non-ASCII, odd spacing
    {"ctx": "A chef in a café in 東京 slices 3 lemons. she",
     "endings": ["adds sugar 🙂 and stirs.", "puts the knife down.",
                 "naïvely juggles   them.", "waves at the camera,\nsmiling."]},
    {"ctx": "How to tie a bowline: Make a small loop. Pass the end up through it.",
     "endings": ["Wrap it around the standing part.", "Then", "Pull tight!!!",
                 "Keep the loop small (about 5 cm) and don't let go."]},
]


def make_items(rng: np.random.Generator) -> list[dict]:
    """``N_ITEMS`` HellaSwag-shaped dicts: the hand-written ones, then seeded word salad
    with contexts of 1-60 words and endings of 1-25 (some rows exceed 64 tokens)."""
    def words(n: int) -> str:
        return " ".join(rng.choice(WORDS, n))

    bodies = list(SPECIAL)
    context_words = [1, 3, 6, 10, 15, 22, 30, 45, 60, 5]
    for n in context_words[:N_ITEMS - len(bodies)]:
        ending_words = rng.integers(1, 26, size=4)
        bodies.append({"ctx": words(n).capitalize() + ".",
                       "endings": [words(int(k)) + "." for k in ending_words]})
    items = []
    for i, body in enumerate(bodies):
        ctx_a, _, ctx_b = body["ctx"].rpartition(" ")
        items.append({"ind": i, "activity_label": "Golden test", "ctx_a": ctx_a, "ctx_b": ctx_b,
                      "ctx": body["ctx"], "split": "val", "split_type": "indomain",
                      "label": int(rng.integers(0, 4)), "endings": body["endings"],
                      "source_id": f"jaxgpt2~golden_{i}"})
    return items


def gpt2_encoding() -> tiktoken.Encoding:
    """tiktoken's own r50k_base (GPT-2's BPE), its ranks read from a local cache."""
    cache = Path(tempfile.mkdtemp())
    shutil.copy(ROOT / "jaxgpt2/assets/r50k_base.tiktoken",
                cache / hashlib.sha1(R50K_URL.encode()).hexdigest())
    os.environ["TIKTOKEN_CACHE_DIR"] = str(cache)
    return tiktoken.get_encoding("r50k_base")


def render(item: dict, enc: tiktoken.Encoding, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """build-nanogpt's ``render_example`` tokens and mask (4, T), each row cut to its last
    ``block`` tokens."""
    ctx_tokens = enc.encode(item["ctx"])
    tok_rows, mask_rows = [], []
    for end in item["endings"]:
        end_tokens = enc.encode(" " + end)
        tok_rows.append((ctx_tokens + end_tokens)[-block:])
        mask_rows.append(([0] * len(ctx_tokens) + [1] * len(end_tokens))[-block:])
    max_len = max(len(row) for row in tok_rows)
    tokens = torch.zeros((4, max_len), dtype=torch.long)
    mask = torch.zeros((4, max_len), dtype=torch.long)
    for i, (tok_row, mask_row) in enumerate(zip(tok_rows, mask_rows)):
        tokens[i, :len(tok_row)] = torch.tensor(tok_row)
        mask[i, :len(mask_row)] = torch.tensor(mask_row)
    return tokens, mask


@torch.no_grad()
def ending_losses(model: GPT2LMHeadModel, tokens: torch.Tensor,
                  mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token loss over each row's ending, and its token count (build-nanogpt)."""
    logits = model(tokens).logits
    shift_logits = logits[..., :-1, :].contiguous()
    shift_tokens = tokens[..., 1:].contiguous()
    losses = F.cross_entropy(shift_logits.view(-1, shift_logits.size(-1)), shift_tokens.view(-1),
                             reduction="none").view(tokens.size(0), -1)
    shift_mask = mask[..., 1:].contiguous()
    return (losses * shift_mask).sum(dim=1), shift_mask.sum(dim=1)


def relative_margin(values: np.ndarray) -> float:
    """Gap between the smallest two values, relative to the smallest's size."""
    low = np.sort(values)
    return float((low[1] - low[0]) / abs(low[0]))


def main() -> None:
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, "
          f"python {sys.version.split()[0]}")
    items = make_items(np.random.default_rng(SEED))
    enc = gpt2_encoding()
    model = GPT2LMHeadModel.from_pretrained(MODEL, attn_implementation="eager").eval()
    block = model.config.n_positions
    model32 = GPT2LMHeadModel.from_pretrained(MODEL, attn_implementation="eager").eval()
    model.double()

    sums, counts, sums32, cut = [], [], [], 0
    for item in items:
        tokens, mask = render(item, enc, block)
        loss_sum, count = ending_losses(model, tokens, mask)
        sums.append(loss_sum.numpy())
        counts.append(count.numpy())
        sums32.append(ending_losses(model32, tokens, mask)[0].numpy().astype(np.float64))
        ctx_len = len(enc.encode(item["ctx"]))
        cut += max(ctx_len + len(enc.encode(" " + e)) for e in item["endings"]) > block
    sums, counts, sums32 = np.array(sums), np.array(counts), np.array(sums32)
    assert sums.dtype == np.float64
    means = sums / counts
    labels = np.array([item["label"] for item in items])
    pred, pred_norm = sums.argmin(1), means.argmin(1)
    margin = min(min(relative_margin(s), relative_margin(m)) for s, m in zip(sums, means))
    assert margin > MIN_MARGIN, f"a near tie (relative margin {margin:.2e}); change the items"
    assert 0 < cut < len(items), "some, not all, items should exceed the model's positions"

    golden = {
        "model": str(MODEL.relative_to(ROOT)), "block_size": block,
        "torch_version": torch.__version__, "transformers_version": transformers.__version__,
        "n": len(items), "acc": float(np.mean(pred == labels)),
        "acc_norm": float(np.mean(pred_norm == labels)),
        "labels": labels.tolist(), "pred": pred.tolist(), "pred_norm": pred_norm.tolist(),
        "loss_sums": sums.tolist(), "token_counts": counts.tolist(),
        "cropped_examples": int(cut), "min_relative_margin": margin,
        "hf_float32_max_relative_error": float(np.max(np.abs(sums32 - sums) / np.abs(sums))),
    }
    OUT.mkdir(parents=True, exist_ok=True)
    with (OUT / "items.jsonl").open("w", encoding="utf-8") as f:
        for item in items:
            f.write(json.dumps(item, ensure_ascii=False) + "\n")
    (OUT / "golden.json").write_text(json.dumps(golden, indent=1) + "\n")
    for file in sorted(OUT.iterdir()):
        digest = hashlib.sha256(file.read_bytes()).hexdigest()[:16]
        print(f"{file.relative_to(ROOT)}  {file.stat().st_size:>7,d} B  sha256 {digest}")
    print(f"acc {golden['acc']:.4f}  acc_norm {golden['acc_norm']:.4f}  n {len(items)}  "
          f"cropped {cut}  margin {margin:.2e}  "
          f"HF float32 rel. err {golden['hf_float32_max_relative_error']:.2e}")


if __name__ == "__main__":
    main()
