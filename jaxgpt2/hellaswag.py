"""HellaSwag accuracy, scored as llm.c and build-nanogpt score it ("completion style").

The data is the published JSONL (``hellaswag_val.jsonl``: 10,042 lines), which the user
brings: nothing is downloaded. Of each line ``ctx``, ``endings`` (4) and ``label`` are
read, the other fields ignored. Each ending's row is ``encode(ctx) + encode(" " +
ending)`` in GPT-2's BPE and its score is the loss summed over the ending's tokens, each
predicted from the position before it; ``acc`` picks the ending of lowest summed loss,
``acc_norm`` the lowest mean loss per ending token (a tie goes to the first, as argmin).

A row longer than the model's ``block_size`` keeps its last ``block_size`` tokens: the
context is cut from the left (llm.c refuses such rows; GPT-2's 1024 positions never need
it on HellaSwag). Several examples share a batch, right-padded to a multiple of 32
positions, so the jitted step compiles for a few lengths only; padding after the real
tokens cannot change them, the attention being causal.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxgpt2.errors import InputError, NotFoundError
from jaxgpt2.model import GPT
from jaxgpt2.tokenizer import GPT2Tokenizer

ENDINGS = 4
PAD_MULTIPLE = 32
METRICS = ("hellaswag_acc", "hellaswag_acc_norm")

Batch = dict[str, np.ndarray]


@dataclass(frozen=True)
class Example:
    """One item in GPT-2 token ids: the shared context, the four endings, the right one."""

    context: tuple[int, ...]
    endings: tuple[tuple[int, ...], ...]
    label: int


@dataclass
class Scores:
    """Accuracies over ``n`` examples, and what decided them: each ending's summed loss
    and number of scored tokens, both shaped (n, 4)."""

    acc: float
    acc_norm: float
    n: int
    loss_sums: np.ndarray
    token_counts: np.ndarray


# ------------------------------------------------------------------------ reading


def read_items(path: str | Path, limit: int | None = None) -> list[dict]:
    """``ctx``, ``endings`` and ``label`` of each non-blank line (the first ``limit``),
    checked, so a bad line is named rather than scored."""
    path = Path(path)
    if not path.is_file():
        raise NotFoundError(f"{path}: no such HellaSwag file (bring the JSONL, e.g. "
                            "hellaswag_val.jsonl; nothing is downloaded)")
    items: list[dict] = []
    with path.open("rb") as lines:
        for number, line in enumerate(lines, 1):
            if limit is not None and len(items) >= limit:
                break
            if line.strip():
                items.append(_parse_item(line, f"{path}:{number}"))
    if not items:
        raise InputError(f"{path}: no HellaSwag examples in it")
    return items


def _parse_item(line: bytes, where: str) -> dict:
    try:
        item = json.loads(line)
    except ValueError as err:  # JSONDecodeError and UnicodeDecodeError both
        raise InputError(f"{where}: not a line of JSON ({err})") from None
    if not isinstance(item, dict):
        raise InputError(f"{where}: expected a JSON object with ctx, endings and label")
    ctx, endings, label = item.get("ctx"), item.get("endings"), item.get("label")
    if not isinstance(ctx, str) or not ctx:
        raise InputError(f"{where}: 'ctx' must be a non-empty string, got {ctx!r}")
    if not (isinstance(endings, list) and len(endings) == ENDINGS
            and all(isinstance(e, str) for e in endings)):
        raise InputError(f"{where}: 'endings' must be a list of {ENDINGS} strings")
    if type(label) is not int or not 0 <= label < ENDINGS:
        raise InputError(f"{where}: 'label' must be an integer from 0 to {ENDINGS - 1}, "
                         f"got {label!r}")
    return {"ctx": ctx, "endings": endings, "label": label}


def render(item: dict, tokenizer: GPT2Tokenizer) -> Example:
    """Ids as build-nanogpt's ``render_example`` makes them: an ending gets a leading
    space, since GPT-2's BPE keeps a word's space inside the word's token."""
    return Example(tuple(tokenizer.encode(item["ctx"])),
                   tuple(tuple(tokenizer.encode(" " + e)) for e in item["endings"]),
                   item["label"])


def load_examples(path: str | Path, limit: int | None = None) -> list[Example]:
    """The first ``limit`` (default: all) examples of a HellaSwag JSONL file, tokenized."""
    tokenizer = GPT2Tokenizer()
    return [render(item, tokenizer) for item in read_items(path, limit)]


def check_gpt2(tokenizer_meta: dict | None, where: str) -> None:
    """Refuse a model on another vocabulary: it would score GPT-2 ids as its own."""
    name = (tokenizer_meta or {}).get("tokenizer")
    if name != "gpt2":
        raise InputError(f"HellaSwag is scored in GPT-2's BPE, but {where} uses "
                         f"{'tokenizer ' + repr(name) if name else 'an unknown tokenizer'}")


def crop_note(examples: Sequence[Example], block_size: int) -> str | None:
    """A line saying how many examples lose the start of their context, if any do."""
    cut = sum(len(e.context) + max(map(len, e.endings)) > block_size for e in examples)
    if not cut:
        return None
    return (f"hellaswag: {cut} of {len(examples)} examples are longer than block_size "
            f"{block_size}; their contexts are cut from the left")


# ------------------------------------------------------------------------ scoring


def ending_rows(example: Example, block_size: int) -> list[tuple[list[int], list[int]]]:
    """Each ending's tokens and ending mask (1 on the ending), the last ``block_size``."""
    mask = [0] * len(example.context)
    return [(list(example.context + ending)[-block_size:], (mask + [1] * len(ending))[-block_size:])
            for ending in example.endings]


def pack(examples: Sequence[Example], batch_examples: int, block_size: int) -> Batch:
    """``input_ids``, ``targets`` and ``loss_mask`` for ``4 * batch_examples`` rows; rows
    past the given examples are padding. The length is the longest row rounded up to a
    multiple of 32, at most ``block_size``, so few shapes are ever compiled."""
    rows = [row for example in examples for row in ending_rows(example, block_size)]
    longest = max(len(tokens) for tokens, _ in rows)
    length = min(block_size, -(-longest // PAD_MULTIPLE) * PAD_MULTIPLE)
    ids = np.zeros((ENDINGS * batch_examples, length), np.int32)
    is_ending = np.zeros_like(ids)
    for i, (tokens, mask) in enumerate(rows):
        ids[i, :len(tokens)], is_ending[i, :len(mask)] = tokens, mask
    # Position t predicts token t + 1, scored when that token belongs to the ending.
    targets, loss_mask = np.zeros_like(ids), np.zeros(ids.shape, np.float32)
    targets[:, :-1], loss_mask[:, :-1] = ids[:, 1:], is_ending[:, 1:]
    return {"input_ids": ids, "targets": targets, "loss_mask": loss_mask}


def make_score_step(model: GPT) -> Callable:
    """``score_step(params, batch) -> (rows,)`` float32 summed loss of each row's ending."""

    def score_step(params: Any, batch: Batch) -> jax.Array:
        nll = model.apply({"params": params}, batch["input_ids"], batch["targets"],
                          method=GPT.token_nll)
        return jnp.sum(nll * batch["loss_mask"], axis=-1)

    return score_step


def score(step: Callable, params: Any, examples: Sequence[Example], block_size: int,
          batch_examples: int = 8, place: Callable[[Batch], Any] = lambda batch: batch) -> Scores:
    """Score ``examples`` with a (jitted) ``make_score_step``, ``batch_examples`` a batch.

    Every batch is dispatched before any result is read, so packing overlaps the device.
    """
    pending, counts = [], []
    for start in range(0, len(examples), batch_examples):
        chunk = examples[start:start + batch_examples]
        batch = pack(chunk, batch_examples, block_size)
        n_rows = ENDINGS * len(chunk)
        pending.append((step(params, place(batch)), n_rows))
        counts.append(batch["loss_mask"][:n_rows].sum(axis=-1))
    loss_sums = np.concatenate([np.asarray(out, np.float64)[:n] for out, n in pending])
    return _accuracies(loss_sums.reshape(-1, ENDINGS),
                       np.concatenate(counts).astype(np.int64).reshape(-1, ENDINGS),
                       np.array([e.label for e in examples]))


def _accuracies(loss_sums: np.ndarray, token_counts: np.ndarray, labels: np.ndarray) -> Scores:
    acc = float(np.mean(loss_sums.argmin(axis=1) == labels))
    acc_norm = float(np.mean((loss_sums / token_counts).argmin(axis=1) == labels))
    return Scores(acc, acc_norm, len(labels), loss_sums, token_counts)


def place_replicated(sharding: jax.sharding.Sharding) -> Callable[[Batch], dict]:
    """Put a host batch whole on every device of ``sharding`` (every process holds all
    of it), for a step jitted with that sharding."""

    def place(batch: Batch) -> dict:
        return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}

    return place


@dataclass
class HellaSwagEvaluation:
    """``hellaswag_acc`` and ``hellaswag_acc_norm`` of a training run's parameters, at
    every evaluation (``jaxgpt2.evaluation``)."""

    step: Callable
    examples: list[Example]
    block_size: int
    batch_examples: int
    place: Callable[[Batch], Any]
    metrics: tuple[str, ...] = METRICS

    def __call__(self, params: Any) -> dict[str, float]:
        scores = score(self.step, params, self.examples, self.block_size, self.batch_examples,
                       self.place)
        return {"hellaswag_acc": scores.acc, "hellaswag_acc_norm": scores.acc_norm}

    def compile(self, params: Any) -> None:
        """The scoring step for each batch length the examples pack to."""
        lengths = set()
        for start in range(0, len(self.examples), self.batch_examples):
            batch = pack(self.examples[start:start + self.batch_examples], self.batch_examples,
                         self.block_size)
            if batch["input_ids"].shape[1] not in lengths:
                lengths.add(batch["input_ids"].shape[1])
                self.step.lower(params, self.place(batch)).compile()
