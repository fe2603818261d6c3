"""Batches from prepared token files.

A batch is a function of ``(seed, step)`` alone, never of an iterator's history: resuming
at step ``s`` replays exactly the batches an uninterrupted run would have seen, and every
process of a multi-host run draws the same global batch and keeps only its own rows.

Batches are dicts of numpy arrays shaped (grad_accum, batch, block_size):
``input_ids``, ``targets`` and ``loss_mask`` (1.0 for real target tokens), plus
``attention_mask`` in the padded-document mode.
"""

from __future__ import annotations

import json
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from jaxgpt2.errors import DataError
from jaxgpt2.prepare import BUNDLED, ensure_bundled
from jaxgpt2.tokenizer import Tokenizer, tokenizer_from_meta

Batch = dict[str, np.ndarray]


@dataclass
class Split:
    tokens: np.ndarray  # memmap of token ids
    doc_starts: np.ndarray  # start offset of each document


@dataclass
class Dataset:
    path: Path
    meta: dict
    train: Split
    val: Split

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    def tokenizer(self) -> Tokenizer:
        return tokenizer_from_meta(self.meta)


def resolve_dataset_dir(dataset: str, cache_dir: str) -> Path:
    """A bundled corpus name (prepared on first use) or a prepared folder's path."""
    if dataset in BUNDLED:
        return ensure_bundled(dataset, cache_dir)
    return Path(dataset)


def open_dataset(path: str | Path, min_tokens: int = 2) -> Dataset:
    """Open and check a prepared folder: files present, non-empty, long enough for one
    window of ``min_tokens``, and every id inside the vocabulary."""
    path = Path(path)
    meta = read_meta(path)
    splits = {name: open_split(path, name, meta, min_tokens) for name in ("train", "val")}
    return Dataset(path, meta, splits["train"], splits["val"])


def read_meta(path: Path) -> dict:
    """A prepared folder's ``meta.json``, or a DataError saying how to make one."""
    meta_file = path / "meta.json"
    if not path.is_dir():
        raise DataError(f"data folder {str(path)!r} does not exist; make one with "
                        "`python -m jaxgpt2.prepare <text files> --out <folder>` or use a "
                        f"bundled dataset ({', '.join(BUNDLED)})")
    if not meta_file.exists():
        raise DataError(f"{meta_file} is missing: {str(path)!r} is empty or was not fully "
                        "prepared; rerun `python -m jaxgpt2.prepare ... --out " f"{path}`")
    return json.loads(meta_file.read_text())


def open_split(path: Path, name: str, meta: dict, min_tokens: int = 2) -> Split:
    """One split of a prepared folder, checked as ``open_dataset`` checks both (this reads
    the whole file once, so a tool that needs one split opens only that one)."""
    file = path / f"{name}.bin"
    if not file.exists() or file.stat().st_size == 0:
        raise DataError(f"{file} is missing or empty; rerun `python -m jaxgpt2.prepare`")
    tokens = np.memmap(file, dtype=np.dtype(meta["dtype"]), mode="r")
    if tokens.size < min_tokens:
        raise DataError(f"{file} holds {tokens.size} tokens, fewer than block_size+1="
                        f"{min_tokens}; use more text or a smaller model.block_size")
    biggest = max(int(chunk.max()) for chunk in _chunks(tokens))
    if biggest >= int(meta["vocab_size"]):
        raise DataError(f"{file} contains token id {biggest}, outside the vocabulary of "
                        f"{meta['vocab_size']} in meta.json; the shard and meta.json do not "
                        "belong together, re-prepare the folder")
    docs_file = path / f"{name}_docs.npy"
    starts = np.load(docs_file, allow_pickle=False) if docs_file.exists() else np.zeros(1, np.int64)
    return Split(tokens, starts)


def _chunks(tokens: np.ndarray, size: int = 1 << 26) -> Iterator[np.ndarray]:
    for start in range(0, tokens.size, size):
        yield tokens[start:start + size]


def window_batch(split: Split, rng: np.random.Generator, rows: int, block_size: int) -> Batch:
    """nanoGPT-style pretraining batch: random contiguous windows of block_size + 1."""
    starts = rng.integers(0, split.tokens.size - block_size, size=rows)
    windows = np.stack([split.tokens[s:s + block_size + 1] for s in starts]).astype(np.int32)
    return {"input_ids": windows[:, :-1], "targets": windows[:, 1:],
            "loss_mask": np.ones((rows, block_size), np.float32)}


def padded_batch(split: Split, rng: np.random.Generator, rows: int, block_size: int) -> Batch:
    """One random document per row, cut to block_size + 1 tokens and right-padded; the
    padding is masked out of attention and of the loss."""
    ends = np.append(split.doc_starts[1:], split.tokens.size)
    picks = rng.integers(0, split.doc_starts.size, size=rows)
    ids = np.zeros((rows, block_size + 1), np.int32)
    real = np.zeros((rows, block_size + 1), bool)
    for row, doc in enumerate(picks):
        piece = split.tokens[split.doc_starts[doc]:min(ends[doc], split.doc_starts[doc] + block_size + 1)]
        ids[row, :piece.size] = piece
        real[row, :piece.size] = True
    return {"input_ids": ids[:, :-1], "targets": ids[:, 1:],
            "loss_mask": real[:, 1:].astype(np.float32),
            "attention_mask": real[:, :-1].astype(np.int32)}


# Each split draws from its own random stream: the trainer, ``jaxgpt2.evaluate`` and any
# later reader of a run rebuild the same batches from (seed, stream, step).
STREAMS = {"train": 0, "val": 1}


def mean_loss(eval_step: Callable, params, source: Callable[[int], Batch], batches: int,
              place: Callable[[Batch], object] = lambda batch: batch) -> tuple[float, float]:
    """Token-weighted mean of ``eval_step(params, batch) -> (loss_sum, count)`` over the
    first ``batches`` batches of ``source``, and the number of tokens scored."""
    total, count = 0.0, 0.0
    for i in range(batches):
        loss_sum, n = eval_step(params, place(source(i)))
        total, count = total + float(loss_sum), count + float(n)
    return total / max(count, 1.0), count


class BatchSource:
    """Deterministic batches for each step of a split.

    ``rows`` of ``grad_accum * batch_size`` are drawn from ``(seed, stream, step)``; this
    process keeps rows ``[row_start, row_stop)`` of each micro-batch (multi-host slicing).
    """

    def __init__(self, split: Split, mode: str, batch_size: int, block_size: int,
                 grad_accum: int, seed: int, stream: int, row_start: int = 0,
                 row_stop: int | None = None) -> None:
        self.split, self.batch_size, self.block_size = split, batch_size, block_size
        self.grad_accum, self.seed, self.stream = grad_accum, seed, stream
        self.make = window_batch if mode == "windows" else padded_batch
        self.rows = slice(row_start, batch_size if row_stop is None else row_stop)

    def __call__(self, step: int) -> Batch:
        rng = np.random.default_rng([self.seed, self.stream, step])
        flat = self.make(self.split, rng, self.grad_accum * self.batch_size, self.block_size)
        return {k: v.reshape(self.grad_accum, self.batch_size, -1)[:, self.rows]
                for k, v in flat.items()}


class Prefetcher:
    """Builds and transfers upcoming batches on a background thread while the device
    computes the current step. ``place`` moves a numpy batch onto the devices."""

    def __init__(self, source: Callable[[int], Batch], place: Callable[[Batch], object],
                 first_step: int, depth: int = 2) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, args=(source, place, first_step),
                                        daemon=True)
        self._thread.start()

    def _fill(self, source, place, step) -> None:
        while not self._stop.is_set():
            try:
                item = (step, place(source(step)))
            except Exception as err:  # surfaced to the consumer, not lost in the thread
                item = (step, err)
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item[1], Exception):
                return
            step += 1

    def next(self) -> tuple[int, object]:
        step, batch = self._queue.get()
        if isinstance(batch, Exception):
            raise batch
        return step, batch

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
