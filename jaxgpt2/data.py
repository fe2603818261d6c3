"""Batches from prepared token files.

A batch is a function of ``(seed, step)`` alone, never of an iterator's history: resuming
at step ``s`` replays exactly the batches an uninterrupted run would have seen, and every
process of a multi-host run draws the same global batch and keeps only its own rows.

Batches are dicts of numpy arrays shaped (grad_accum, batch, block_size):
``input_ids``, ``targets`` and ``loss_mask`` (1.0 for real target tokens), plus
``attention_mask`` in the padded-document mode.

A split is one token file or several shards (``jaxgpt2.prepare``); every file is
memory-mapped and checked against ``meta.json`` when opened, so a truncated or
mismatched folder fails at once, naming the file, instead of training on bad ids.
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
from jaxgpt2.prepare import BUNDLED, MARKER, ensure_bundled, sibling
from jaxgpt2.tokenizer import Tokenizer, tokenizer_from_meta

Batch = dict[str, np.ndarray]


@dataclass
class Split:
    """One split: its token files in order (memory-mapped) and the start of every
    document in their concatenation."""

    shards: list[np.ndarray]
    doc_starts: np.ndarray

    def __post_init__(self) -> None:
        self.bounds = np.cumsum([0] + [shard.size for shard in self.shards])

    @property
    def size(self) -> int:
        return int(self.bounds[-1])

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens ``[start, stop)`` of the concatenation, across shard boundaries."""
        shard = int(np.searchsorted(self.bounds, start, side="right")) - 1
        pieces = []
        while start < stop:
            end = min(stop, int(self.bounds[shard + 1]))
            local = start - int(self.bounds[shard])
            pieces.append(self.shards[shard][local:local + end - start])
            start, shard = end, shard + 1
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)


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
    """Open and check a prepared folder: a sound ``meta.json``, every token file present
    and of the size it lists, one window of ``min_tokens`` in some file, and every id
    inside the vocabulary."""
    path = Path(path)
    meta = read_meta(path)
    splits = {name: open_split(path, name, meta, min_tokens) for name in ("train", "val")}
    return Dataset(path, meta, splits["train"], splits["val"])


REPREPARE = "re-prepare it with `python -m jaxgpt2.prepare ... --out {path} --overwrite`"
META_KEYS = ("tokenizer", "vocab_size", "dtype")
DTYPES = ("uint16", "uint32")


def read_meta(path: Path) -> dict:
    """A prepared folder's ``meta.json``, checked, or a DataError saying how to make one."""
    path = Path(path)
    meta_file = path / "meta.json"
    partial = sibling(path, ".partial")
    if not path.is_dir() and partial.is_dir():
        raise DataError(f"data folder {str(path)!r} does not exist: its prepare was interrupted "
                        f"(it left {partial}); rerun the same `python -m jaxgpt2.prepare ... "
                        f"--out {path}` command, which starts over")
    if not path.is_dir():
        raise DataError(f"data folder {str(path)!r} does not exist; make one with "
                        "`python -m jaxgpt2.prepare <text files> --out <folder>` or use a "
                        f"bundled dataset ({', '.join(BUNDLED)})")
    if not meta_file.exists():
        why = f" (its {MARKER} marks an interrupted prepare)" if (path / MARKER).exists() else ""
        raise DataError(f"{meta_file} is missing: {str(path)!r} is empty or was not fully "
                        f"prepared{why}; rerun `python -m jaxgpt2.prepare ... --out {path}`")
    try:
        meta = json.loads(meta_file.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise DataError(f"{meta_file} is not valid JSON ({err}); the folder is damaged, "
                        + REPREPARE.format(path=path)) from None
    _check_meta(meta, meta_file, path)
    return meta


def _check_meta(meta: object, meta_file: Path, path: Path) -> None:
    """The keys every reader relies on, with usable values (a float64 dtype would
    read the ids as garbage floats and train on them)."""
    missing = [k for k in META_KEYS if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise DataError(f"{meta_file} lacks {', '.join(map(repr, missing))}; the folder is "
                        "damaged or not a prepared corpus, " + REPREPARE.format(path=path))
    if meta["dtype"] not in DTYPES:
        raise DataError(f"{meta_file} gives dtype {meta['dtype']!r}; token files are "
                        f"{' or '.join(DTYPES)}, " + REPREPARE.format(path=path))
    if not isinstance(meta["vocab_size"], int) or meta["vocab_size"] < 1:
        raise DataError(f"{meta_file} gives vocab_size {meta['vocab_size']!r}, not a positive "
                        "integer; " + REPREPARE.format(path=path))


def open_split(path: Path, name: str, meta: dict, min_tokens: int = 2) -> Split:
    """One split of a prepared folder, checked as ``open_dataset`` checks both (this reads
    the whole split once, so a tool that needs one split opens only that one).

    ``meta["<name>_shards"]`` lists its files; a folder from before shards has one file,
    ``<name>.bin``, of ``meta["<name>_tokens"]`` tokens."""
    path = Path(path)
    entries = _shard_entries(path, name, meta)
    dtype = np.dtype(meta["dtype"])
    shards = [_open_shard(path, entry, dtype) for entry in entries]
    largest = max(range(len(shards)), key=lambda i: shards[i].size)
    if shards[largest].size < min_tokens:
        of = f" (the largest of {len(shards)} shards)" if len(shards) > 1 else ""
        raise DataError(f"{path / entries[largest]['file']}{of} holds {shards[largest].size} "
                        f"tokens, fewer than block_size+1={min_tokens}; use more text or a "
                        "smaller model.block_size")
    for entry, shard in zip(entries, shards):
        _check_vocabulary(path / entry["file"], shard, meta)
    return Split(shards, _doc_starts(path, entries, shards))


def _shard_entries(path: Path, name: str, meta: dict) -> list[dict]:
    """The split's files and their token counts, as meta.json lists them."""
    meta_file = path / "meta.json"
    entries = meta.get(f"{name}_shards")
    if entries is None and f"{name}_tokens" in meta:
        return [{"file": f"{name}.bin", "tokens": meta[f"{name}_tokens"]}]
    if not isinstance(entries, list) or not entries or not all(
            isinstance(e, dict) and isinstance(e.get("file"), str)
            and isinstance(e.get("tokens"), int) for e in entries):
        raise DataError(f"{meta_file} lacks a list of {name} shards (or {name}_tokens); "
                        + REPREPARE.format(path=path))
    listed = sum(e["tokens"] for e in entries)
    if meta.get(f"{name}_tokens", listed) != listed:
        raise DataError(f"{meta_file} lists {name} shards of {listed:,} tokens in all but "
                        f"{name}_tokens={meta[f'{name}_tokens']:,}; " + REPREPARE.format(path=path))
    return entries


def _open_shard(path: Path, entry: dict, dtype: np.dtype) -> np.ndarray:
    """A token file, memory-mapped, refused unless it holds exactly the tokens listed."""
    file = path / entry["file"]
    if not file.is_file() or file.stat().st_size == 0:
        raise DataError(f"{file} is missing or empty; rerun `python -m jaxgpt2.prepare`")
    size = file.stat().st_size
    if size % dtype.itemsize:
        raise DataError(f"{file} holds {size:,} bytes, not a whole number of {dtype.name} "
                        f"tokens ({dtype.itemsize} bytes each): it is truncated or damaged; "
                        + REPREPARE.format(path=path))
    if size // dtype.itemsize != entry["tokens"]:
        raise DataError(f"{file} holds {size // dtype.itemsize:,} tokens but meta.json lists "
                        f"{entry['tokens']:,}: it is truncated or from another prepare; "
                        + REPREPARE.format(path=path))
    return np.memmap(file, dtype=dtype, mode="r")


def _check_vocabulary(file: Path, tokens: np.ndarray, meta: dict) -> None:
    biggest = max(int(chunk.max()) for chunk in _chunks(tokens))
    if biggest >= int(meta["vocab_size"]):
        raise DataError(f"{file} contains token id {biggest}, outside the vocabulary of "
                        f"{meta['vocab_size']} in meta.json; the shard and meta.json do not "
                        "belong together, re-prepare the folder")


def _doc_starts(path: Path, entries: list[dict], shards: list[np.ndarray]) -> np.ndarray:
    """Every document's start in the split's concatenation, from each shard's offsets
    (``<file stem>_docs.npy``); a folder from before shards may lack them: one document."""
    starts = []
    for entry, offset in zip(entries, np.cumsum([0] + [s.size for s in shards])):
        docs_file = path / (entry["file"].removesuffix(".bin") + "_docs.npy")
        if not docs_file.exists() and "docs" not in entry:
            continue
        try:
            starts.append(np.load(docs_file, allow_pickle=False).astype(np.int64) + offset)
        except (OSError, ValueError) as err:
            raise DataError(f"{docs_file} cannot be read ({err}); "
                            + REPREPARE.format(path=path)) from None
    return np.concatenate(starts) if starts else np.zeros(1, np.int64)


def _chunks(tokens: np.ndarray, size: int = 1 << 26) -> Iterator[np.ndarray]:
    for start in range(0, tokens.size, size):
        yield tokens[start:start + size]


def window_batch(split: Split, rng: np.random.Generator, rows: int, block_size: int) -> Batch:
    """nanoGPT-style pretraining batch: random contiguous windows of block_size + 1.

    A window never spans two shards: a shard of n tokens offers its n - block_size
    starts, and one position is drawn among all shards' starts laid end to end. For a
    single file that is ``rng.integers(0, n - block_size)``, the draw of earlier versions,
    so their runs resume onto the same windows."""
    valid = np.maximum([shard.size - block_size for shard in split.shards], 0)
    ends = np.cumsum(valid)
    picks = rng.integers(0, ends[-1], size=rows)
    shard = np.searchsorted(ends, picks, side="right")
    starts = picks - (ends - valid)[shard]
    windows = np.stack([split.shards[k][s:s + block_size + 1]
                        for k, s in zip(shard, starts)]).astype(np.int32)
    return {"input_ids": windows[:, :-1], "targets": windows[:, 1:],
            "loss_mask": np.ones((rows, block_size), np.float32)}


def padded_batch(split: Split, rng: np.random.Generator, rows: int, block_size: int) -> Batch:
    """One random document per row, cut to block_size + 1 tokens and right-padded; the
    padding is masked out of attention and of the loss. A document continues across a
    shard boundary as it does in the text."""
    ends = np.append(split.doc_starts[1:], split.size)
    picks = rng.integers(0, split.doc_starts.size, size=rows)
    ids = np.zeros((rows, block_size + 1), np.int32)
    real = np.zeros((rows, block_size + 1), bool)
    for row, doc in enumerate(picks):
        start = int(split.doc_starts[doc])
        piece = split.read(start, min(int(ends[doc]), start + block_size + 1))
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
