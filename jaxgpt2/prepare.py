"""Turn text into token files: ``python -m jaxgpt2.prepare INPUT... --out DIR``.

Inputs are files, folders (read recursively) or glob patterns. Documents come from
``.txt`` files (one document each), ``.jsonl``, ``.jsonl.gz`` and ``.jsonl.zst`` files
(one JSON object per line) and ``.parquet`` files (one row each); ``--text_field`` names
the JSON field or parquet column (default ``text``). Parquet and zstd need the ``data``
extra (``pip install 'jaxgpt2[data]'``). A folder contributes only those kinds, in sorted
order, never the files of the output folder; the rest are reported as skipped.

Documents are read lazily, tokenized in chunks by ``--workers`` processes (faster than
threads here: ``docs/performance.md``, "Preparing corpora") and their ids go straight to
shard files of ``--shard_tokens`` tokens, so memory stays bounded whatever the corpus
size. The ids are the same whatever ``--workers``: documents keep their order. GPT-2
documents each end with ``<|endoftext|>``.

The validation split: a single document (Tiny Shakespeare) is cut by characters, its
first ``1 - val_fraction`` to train (nanoGPT's split). Several documents are split whole:
document ``i`` (counting from 0) goes to val when ``floor((i + 1) * f) > floor(i * f)``
for ``f = --val_fraction``, i.e. every 10th document at 0.1; ``--val_tokens N`` stops
that once val holds N tokens, the later documents all going to train.

Layout of ``--out``: per split, either one file (``train.bin``, ``train_docs.npy``: the
layout of earlier versions, still read) or shards ``train_000000.bin``,
``train_000001.bin``... each with its ``train_000000_docs.npy`` (the offsets, inside that
shard, of the documents that start in it). Ids are uint16, or uint32 for a vocabulary
beyond 65,536. ``meta.json`` lists every shard with its token count.

Safety: the corpus is built in the sibling folder ``DIR.partial`` (marked by a
``PREPARING.json`` file) and moved to ``DIR`` only once complete, with ``meta.json``
written last. A killed prepare leaves ``DIR.partial``, which training refuses; rerunning
the command starts over cleanly (it deletes that folder first): no resume, so two corpora
are never mixed. A ``DIR`` that already holds a corpus is refused unless ``--overwrite``,
and then replaced only when the new one is complete.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import itertools
import json
import math
import multiprocessing
import os
import re
import shutil
import signal
import socket
import sys
import threading
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime, timezone
from functools import partial
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Iterator, TextIO

import numpy as np
import tiktoken
from tqdm import tqdm

from jaxgpt2.errors import InputError, NotFoundError, report_errors
from jaxgpt2.tokenizer import ENDOFTEXT, GPT2_EOT_ID, GPT2Tokenizer

BUNDLED = {"shakespeare_char": "char", "shakespeare": "gpt2"}
# Longest first: the kind is the first suffix a file name ends with.
KINDS = (".jsonl.gz", ".jsonl.zst", ".jsonl", ".parquet", ".txt")
EXTRA = "pip install 'jaxgpt2[data]'"
SHARD_TOKENS = 100_000_000
# One window of GPT-2's 1024-token context and its last target: a split shorter than
# this cannot train or score any GPT-2 preset, and is almost always a wrong input (a
# mistyped field or glob) rather than a corpus.
MIN_SPLIT_TOKENS = 1025
MARKER = "PREPARING.json"
ABSENT = np.iinfo(np.uint32).max  # a character outside the vocabulary
CHUNK_CHARS = 1 << 20  # text per tokenization task: large enough to amortize the hand-off
# Every file name prepare writes: a folder holding only these may be replaced.
OWN_FILES = re.compile(r"meta\.json(\.tmp)?|PREPARING\.json|(train|val)(_\d{6})?(\.bin|_docs\.npy)")


# ----------------------------------------------------------------------------- inputs


def input_kind(path: Path) -> str | None:
    """The documented kind a file name ends with, or None."""
    return next((kind for kind in KINDS if path.name.endswith(kind)), None)


def list_inputs(inputs: Iterable[str | Path], reserved: list[Path]) -> list[Path]:
    """The files to read, in order: each input as given, a folder's files sorted, a glob's
    matches sorted, a file named twice once. Files of other kinds in folders, and anything
    under ``reserved`` (the output folders), are skipped and reported."""
    reserved = [r.resolve() for r in reserved]
    files: dict[Path, Path] = {}
    skipped: dict[str, list[Path]] = {"of other kinds": [], "inside the output folder": []}
    for item in inputs:
        for path in _expand(str(item)):
            for file in _files_under(path):
                real = file.resolve()
                if any(real.is_relative_to(r) for r in reserved):
                    skipped["inside the output folder"].append(file)
                elif input_kind(file) is not None:
                    files.setdefault(real, file)
                elif path.is_dir():
                    skipped["of other kinds"].append(file)
                else:
                    raise InputError(f"input {str(file)!r} is not a kind prepare reads; name "
                                     f"files ending in {', '.join(KINDS)}")
    _report_skipped(skipped)
    return list(files.values())


def _expand(item: str) -> list[Path]:
    """An input path, or a glob pattern's sorted matches (for patterns the shell left)."""
    if Path(item).exists():
        return [Path(item)]
    if any(c in item for c in "*?["):
        matches = sorted(glob.glob(item, recursive=True))
        if matches:
            return [Path(m) for m in matches]
        raise NotFoundError(f"input pattern {item!r} matches nothing")
    raise NotFoundError(f"input {item!r} does not exist")


def _files_under(path: Path) -> list[Path]:
    """A file itself; a folder's files, recursively, in sorted order."""
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]


def _report_skipped(skipped: dict[str, list[Path]]) -> None:
    for why, files in skipped.items():
        if files:
            names = ", ".join(str(f) for f in files[:5]) + (", ..." if len(files) > 5 else "")
            print(f"skipped {len(files)} file(s) {why}: {names}")


def check_readers(files: list[Path]) -> None:
    """The optional readers the inputs need, imported now rather than hours in."""
    for kind, module in ((".parquet", "pyarrow.parquet"), (".jsonl.zst", "zstandard")):
        first = next((f for f in files if input_kind(f) == kind), None)
        if first is not None:
            try:
                __import__(module)
            except ImportError:
                raise InputError(f"reading {first} needs the {module.split('.')[0]} package: "
                                 f"{EXTRA}") from None


def read_documents(files: list[Path], text_field: str = "text") -> Iterator[str]:
    """Every non-empty document of ``files``, in order, read lazily."""
    readers = {".txt": _read_txt, ".parquet": _read_parquet, ".jsonl": _read_jsonl,
               ".jsonl.gz": _read_jsonl, ".jsonl.zst": _read_jsonl}
    for file in files:
        for doc in readers[input_kind(file)](file, text_field):
            if doc:
                yield doc


def _read_txt(file: Path, _field: str) -> Iterator[str]:
    """A text file is one document (read whole: it cannot be tokenized in pieces)."""
    try:
        yield file.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise _not_utf8(file, err) from err


def _not_utf8(file: Path, err: Exception) -> InputError:
    """Python's own error names a byte position but not the file, useless in a folder
    of thousands."""
    return InputError(f"{file} is not UTF-8 text ({err}); inputs must be UTF-8: convert it "
                      "(e.g. `iconv -t utf-8`) or leave it out")


def _read_jsonl(file: Path, field: str) -> Iterator[str]:
    """The ``field`` of each line's object; blank lines are allowed. Decoding and
    decompression errors name the file."""
    handle, damaged = _open_lines(file)
    with handle:
        try:
            for lineno, line in enumerate(handle, 1):
                if line.strip():
                    yield _jsonl_text(file, lineno, line, field)
        except UnicodeDecodeError as err:
            raise _not_utf8(file, err) from err
        except damaged as err:
            raise InputError(f"{file} cannot be decompressed ({err}); it is damaged or not "
                             f"{input_kind(file)}") from err


def _open_lines(file: Path) -> tuple[TextIO, tuple[type[Exception], ...]]:
    """A JSONL file opened as text by its suffix, and the errors that mean it is damaged."""
    kind = input_kind(file)
    if kind == ".jsonl.gz":
        return gzip.open(file, "rt", encoding="utf-8"), (OSError, EOFError)
    if kind == ".jsonl.zst":
        import zstandard
        return zstandard.open(file, "rt", encoding="utf-8"), (zstandard.ZstdError,)
    return open(file, encoding="utf-8"), ()


def _jsonl_text(file: Path, lineno: int, line: str, field: str) -> str:
    """One JSONL line's text. json's own error says "line 1 column 1" of the line alone,
    so the file and its line number are added here."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise InputError(f"{file}:{lineno}: not valid JSON ({err}); each line must be a JSON "
                         f"object with a string {field!r} field") from err
    if not isinstance(record, dict) or not isinstance(record.get(field), str):
        raise InputError(f"{file}:{lineno}: each JSONL line must be an object with a string "
                         f"{field!r} field (--text_field names another)")
    return record[field]


def _read_parquet(file: Path, field: str) -> Iterator[str]:
    """Column ``field`` of each row, a record batch at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(file)
    except (pa.ArrowException, OSError) as err:
        raise InputError(f"{file} is not a readable parquet file ({err})") from err
    schema = parquet.schema_arrow
    if field not in schema.names:
        raise InputError(f"{file} has no column {field!r} (it has {', '.join(schema.names)}); "
                         "name the text column with --text_field")
    column_type = schema.field(field).type
    if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
        raise InputError(f"{file}: column {field!r} holds {column_type}, not strings")
    row = 0
    for batch in parquet.iter_batches(batch_size=1024, columns=[field]):
        for text in batch.column(0).to_pylist():
            if text is None:
                raise InputError(f"{file}: row {row} of column {field!r} is null")
            row += 1
            yield text


# ----------------------------------------------------------------------------- encoding


Encoder = Callable[[list[str]], list[np.ndarray]]


def make_encoder(chars: list[str] | None, dtype: np.dtype) -> Encoder:
    """``documents -> their ids`` in the file dtype: GPT-2's, each document ending with
    ``<|endoftext|>``, or (given ``chars``) the character vocabulary's."""
    if chars is None:
        return partial(_encode_gpt2, GPT2Tokenizer().encoding, dtype)
    table = np.full(sys.maxunicode + 1, ABSENT, np.uint32)
    table[[ord(c) for c in chars]] = np.arange(len(chars))
    return partial(_encode_chars, table, dtype)


def _encode_gpt2(encoding: tiktoken.Encoding, dtype: np.dtype, docs: list[str]) -> list[np.ndarray]:
    """The documents joined by ``<|endoftext|>`` are encoded in one call, which encodes
    the text between special tokens piece by piece, so each document keeps its own ids;
    one call per chunk keeps the GIL released long enough for threads to scale. A
    document holding the text ``<|endoftext|>`` must keep it as text: such a chunk is
    encoded document by document."""
    if any(ENDOFTEXT in doc for doc in docs):
        return [np.append(encoding.encode_to_numpy(doc, disallowed_special=()),
                          GPT2_EOT_ID).astype(dtype) for doc in docs]
    ids = encoding.encode_to_numpy(ENDOFTEXT.join(docs) + ENDOFTEXT,
                                   allowed_special={ENDOFTEXT}).astype(dtype)
    return np.split(ids, np.flatnonzero(ids == GPT2_EOT_ID)[:-1] + 1)


def _encode_chars(table: np.ndarray, dtype: np.dtype, docs: list[str]) -> list[np.ndarray]:
    """Characters looked up in a table over every code point (4 MB): about 20x faster
    than ``CharTokenizer``'s dict on Tiny Shakespeare, and the same ids."""
    encoded = []
    for doc in docs:
        ids = table[np.frombuffer(doc.encode("utf-32-le"), np.uint32)]
        if ids.max() == ABSENT:
            raise InputError("an input changed between prepare's two reads (a character "
                             "outside the vocabulary collected first); rerun when it is stable")
        encoded.append(ids.astype(dtype))
    return encoded


def chunks(docs: Iterator[str], size: int) -> Iterator[list[str]]:
    """Documents grouped into lists of about ``size`` characters (at least one each)."""
    chunk, chars = [], 0
    for doc in docs:
        chunk.append(doc)
        chars += len(doc)
        if chars >= size:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


def encode_in_order(docs: Iterator[str], chars: list[str] | None, dtype: np.dtype,
                    workers: int) -> Iterator[list[np.ndarray]]:
    """Each chunk of documents' ids, in input order: encoded here for one worker or a
    corpus of one chunk (a pool's start would cost more than it saves), else by a pool
    of ``workers`` processes."""
    chunked = chunks(docs, CHUNK_CHARS)
    head = list(itertools.islice(chunked, 2))
    chunked = itertools.chain(head, chunked)
    if workers == 1 or len(head) < 2:
        return map(make_encoder(chars, dtype), chunked)
    return _encode_in_pool(chunked, chars, dtype, workers)


def _encode_in_pool(chunked: Iterator[list[str]], chars: list[str] | None, dtype: np.dtype,
                    workers: int) -> Iterator[list[np.ndarray]]:
    """Processes, not threads (faster: ``docs/performance.md``), with at most two chunks
    per process in flight, so memory stays bounded. ``forkserver`` starts them: they
    inherit nothing from a parent that may be running JAX's threads."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["jaxgpt2.tokenizer"])
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker,
                               initargs=(chars, dtype, os.getpid()))
    pending: deque = deque()
    try:
        for chunk in chunked:
            pending.append(pool.submit(_encode_in_worker, chunk))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


_worker_encoder: Encoder | None = None  # a worker process's own


def _start_worker(chars: list[str] | None, dtype: np.dtype, prepare_pid: int) -> None:
    """A worker's encoder, and a watch that ends the worker once the prepare that
    started it is gone: after a SIGKILL, pool workers (and the forkserver, which they
    keep alive) would otherwise wait forever. Ctrl-C is the main process' to handle: it
    stops the pool and removes the unfinished folder."""
    global _worker_encoder
    _worker_encoder = make_encoder(chars, dtype)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_after, args=(prepare_pid,), daemon=True).start()


def _exit_after(pid: int) -> None:
    while True:
        time.sleep(1)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            os._exit(1)


def _encode_in_worker(docs: list[str]) -> list[np.ndarray]:
    return _worker_encoder(docs)


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits (GPT-2's 50,257 do): half the disk and reads of uint32."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


# ----------------------------------------------------------------------------- writing


class ShardWriter:
    """One split's ids, appended to shard files of ``shard_tokens`` tokens as they come.

    Every shard but the last is full, so a document may continue into the next shard;
    each shard's ``_docs.npy`` holds the offsets of the documents that start in it."""

    def __init__(self, folder: Path, split: str, shard_tokens: int) -> None:
        self.folder, self.split, self.shard_tokens = folder, split, shard_tokens
        self.shards: list[dict] = []
        self.tokens = self.docs = 0
        self._file: BinaryIO | None = None
        self._filled = 0
        self._starts: list[int] = []

    def add(self, ids: np.ndarray) -> None:
        """One document's ids."""
        if self._file is None:
            self._open()
        self._starts.append(self._filled)
        self.tokens, self.docs = self.tokens + ids.size, self.docs + 1
        while ids.size:
            if self._file is None:
                self._open()
            piece = ids[:self.shard_tokens - self._filled]
            self._file.write(piece.tobytes())
            self._filled += piece.size
            ids = ids[piece.size:]
            if self._filled == self.shard_tokens:
                self._close()

    def finish(self) -> dict:
        """Close the last shard and return the split's ``meta.json`` entries; a split of
        one shard takes the single-file names."""
        if self._file is not None:
            self._close()
        if len(self.shards) == 1:
            os.replace(self.folder / self.shards[0]["file"], self.folder / f"{self.split}.bin")
            os.replace(self.folder / _docs_name(self.shards[0]["file"]),
                       self.folder / f"{self.split}_docs.npy")
            self.shards[0]["file"] = f"{self.split}.bin"
        return {f"{self.split}_tokens": self.tokens, f"{self.split}_docs": self.docs,
                f"{self.split}_shards": self.shards}

    def _name(self) -> str:
        return f"{self.split}_{len(self.shards):06d}.bin"

    def _open(self) -> None:
        self._file = open(self.folder / self._name(), "wb", buffering=1 << 20)
        self._filled, self._starts = 0, []

    def _close(self) -> None:
        self._file.close()
        self._file = None
        np.save(self.folder / _docs_name(self._name()), np.asarray(self._starts, np.int64))
        self.shards.append({"file": self._name(), "tokens": self._filled,
                            "docs": len(self._starts)})


def _docs_name(bin_name: str) -> str:
    """A shard's document offsets file: ``train_000003.bin`` -> ``train_000003_docs.npy``."""
    return bin_name.removesuffix(".bin") + "_docs.npy"


def is_val(index: int, val_fraction: float) -> bool:
    """Document ``index`` goes to val: every ``1/val_fraction``-th document, spread evenly."""
    return math.floor((index + 1) * val_fraction) > math.floor(index * val_fraction)


# ----------------------------------------------------------------------------- the output folder


def sibling(out: Path, suffix: str) -> Path:
    """``DIR.partial`` (a corpus being built) or ``DIR.replaced`` (one being swapped out)."""
    return out.parent / (out.name + suffix)


def describe(folder: Path) -> str:
    """What a prepared folder holds, for a refusal: tokenizer, token counts, when."""
    meta_file = folder / "meta.json"
    written = datetime.fromtimestamp(meta_file.stat().st_mtime, timezone.utc)
    when = written.strftime("%Y-%m-%d %H:%M UTC")
    try:
        meta = json.loads(meta_file.read_text())
        counts = f"{meta['train_tokens']:,} train and {meta['val_tokens']:,} val tokens"
        return f"{meta['tokenizer']} tokens, {counts}, written {when}"
    except (ValueError, KeyError, TypeError):
        return f"an unreadable meta.json written {when}"


def _owned(folder: Path) -> bool:
    """Whether ``folder`` holds nothing but files prepare writes (so it may be replaced)."""
    return all(entry.is_file() and OWN_FILES.fullmatch(entry.name) for entry in folder.iterdir())


def claim_output(out: Path, overwrite: bool) -> Path:
    """Check that ``out`` may receive a corpus and return a fresh ``out.partial`` to
    build it in. A folder with a corpus needs ``overwrite``; a folder with anything else
    is never replaced; a partial folder left by a killed prepare is deleted."""
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is an existing file, not a folder; name a folder")
    if out.is_dir() and not _owned(out):
        entries = sorted(e.name for e in out.iterdir())
        raise InputError(f"--out {out} holds files prepare did not write ({', '.join(entries[:5])}"
                         f"{', ...' if len(entries) > 5 else ''}); name a new or empty folder")
    if (out / "meta.json").exists() and not overwrite:
        raise InputError(f"--out {out} already holds a prepared corpus ({describe(out)}); pass "
                         "--overwrite to replace it (once the new one is complete) or name "
                         "another folder")
    for stale in (sibling(out, ".partial"), sibling(out, ".replaced")):
        _remove_stale(stale)
    partial = sibling(out, ".partial")
    partial.mkdir(parents=True)
    (partial / MARKER).write_text(json.dumps({
        "command": sys.argv, "pid": os.getpid(), "host": socket.gethostname(),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}))
    return partial


def _remove_stale(folder: Path) -> None:
    """Delete what an interrupted prepare left, and nothing else."""
    if not folder.exists():
        return
    if not folder.is_dir() or not _owned(folder):
        raise InputError(f"{folder} exists and was not written by prepare; move it away (prepare "
                         "builds the new corpus there)")
    print(f"removing {folder}, left by an interrupted prepare")
    shutil.rmtree(folder)


def publish(partial: Path, out: Path) -> None:
    """Move the finished corpus to ``out``; an old one there is swapped out, then deleted."""
    if out.is_dir() and any(out.iterdir()):
        replaced = sibling(out, ".replaced")
        os.replace(out, replaced)
        os.replace(partial, out)
        shutil.rmtree(replaced)
    else:  # rename() replaces an empty folder
        os.replace(partial, out)


def write_meta(folder: Path, meta: dict) -> None:
    """``meta.json``, written last and atomically: a folder with one is complete."""
    tmp = folder / "meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, folder / "meta.json")
    (folder / MARKER).unlink()


# ----------------------------------------------------------------------------- prepare


def _check_options(tokenizer: str, val_fraction: float, val_tokens: int | None,
                   workers: int, shard_tokens: int) -> None:
    """Every option, checked before anything is read (a corpus can take hours)."""
    if tokenizer not in ("gpt2", "char"):
        raise InputError(f"tokenizer must be 'gpt2' or 'char', got {tokenizer!r}")
    if not 0 < val_fraction < 1:
        raise InputError(f"--val_fraction must be between 0 and 1 (exclusive), got "
                         f"{val_fraction}; 0.1 (the default) holds out a tenth for validation")
    if val_tokens is not None and val_tokens < MIN_SPLIT_TOKENS:
        raise InputError(f"--val_tokens must be at least {MIN_SPLIT_TOKENS:,} (one GPT-2 "
                         f"window), got {val_tokens}")
    if workers < 1:
        raise InputError(f"--workers must be at least 1, got {workers}")
    if shard_tokens < MIN_SPLIT_TOKENS:
        raise InputError(f"--shard_tokens must be at least {MIN_SPLIT_TOKENS:,} (one GPT-2 "
                         f"window per shard), got {shard_tokens}")


def default_workers() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def prepare(inputs: Iterable[str | Path], out_dir: str | Path, tokenizer: str = "gpt2",
            val_fraction: float = 0.1, *, val_tokens: int | None = None,
            text_field: str = "text", workers: int | None = None,
            shard_tokens: int = SHARD_TOKENS, overwrite: bool = False,
            progress: bool = False) -> dict:
    """Tokenize ``inputs`` into ``out_dir`` (see the module docstring); returns the
    ``meta.json`` contents. Any error, or Ctrl-C, leaves ``out_dir`` as it was."""
    workers = default_workers() if workers is None else workers
    _check_options(tokenizer, val_fraction, val_tokens, workers, shard_tokens)
    out = Path(os.path.abspath(out_dir))
    inputs = list(inputs)
    files = list_inputs(inputs, [out, sibling(out, ".partial"), sibling(out, ".replaced")])
    check_readers(files)
    partial = claim_output(out, overwrite)
    try:
        read = lambda: _nonempty(read_documents(files, text_field), inputs)
        chars = sorted(_characters(read())) if tokenizer == "char" else None
        meta = vocabulary_meta(chars)
        writers = {split: ShardWriter(partial, split, shard_tokens) for split in ("train", "val")}
        _write_splits(read(), chars, np.dtype(meta["dtype"]), writers, workers, val_fraction,
                      val_tokens, progress)
        for writer in writers.values():
            meta.update(writer.finish())
        write_meta(partial, meta)
        publish(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return meta


def vocabulary_meta(chars: list[str] | None) -> dict:
    """The ``meta.json`` entries that name the tokenizer: GPT-2's, or ``chars``'."""
    if chars is None:
        return {"tokenizer": "gpt2", "vocab_size": GPT2Tokenizer.vocab_size, "dtype":
                token_dtype(GPT2Tokenizer.vocab_size).name, "eot_id": GPT2Tokenizer.eot_id}
    return {"tokenizer": "char", "vocab_size": len(chars),
            "dtype": token_dtype(len(chars)).name, "eot_id": None, "chars": chars}


def _write_splits(docs: Iterator[str], chars: list[str] | None, dtype: np.dtype,
                  writers: dict[str, ShardWriter], workers: int, val_fraction: float,
                  val_tokens: int | None, progress: bool) -> None:
    """Every document to its split (one document is cut by characters), then the size
    check; the first two documents tell which case this is."""
    first, second = next(docs), next(docs, None)
    if second is None:
        _write_one_document(first, make_encoder(chars, dtype), writers, val_fraction,
                            val_tokens)
    else:
        encoded = encode_in_order(itertools.chain([first, second], docs), chars, dtype, workers)
        _write_documents(encoded, writers, val_fraction, val_tokens, progress)
    _check_sizes(writers)


def _nonempty(docs: Iterator[str], inputs: list) -> Iterator[str]:
    """``docs``, refusing an input without any text before anything is written."""
    first = next(docs, None)
    if first is None:
        raise InputError(f"no text found in {[str(i) for i in inputs]}; expected "
                         f"{', '.join(KINDS)} files (JSONL lines and parquet rows need the "
                         "--text_field, default 'text')")
    return itertools.chain([first], docs)


def _characters(docs: Iterator[str]) -> set[str]:
    """The character vocabulary: a first read of the corpus, since ids depend on it."""
    chars: set[str] = set()
    for doc in docs:
        chars.update(doc)
    return chars


def _write_one_document(doc: str, encode: Encoder,
                        writers: dict[str, ShardWriter], val_fraction: float,
                        val_tokens: int | None) -> None:
    """A single document is cut by characters: the first ``1 - val_fraction`` to train,
    the rest to val (nanoGPT's split of Tiny Shakespeare)."""
    if val_tokens is not None:
        raise InputError("--val_tokens needs several documents; a single document is cut "
                         "by --val_fraction of its characters")
    cut = int(len(doc) * (1 - val_fraction))
    for split, text in (("train", doc[:cut]), ("val", doc[cut:])):
        if text:
            writers[split].add(encode([text])[0])


def _write_documents(encoded: Iterator[list[np.ndarray]], writers: dict[str, ShardWriter],
                     val_fraction: float, val_tokens: int | None, progress: bool) -> None:
    """Append each document's ids, in order, to its split (see ``is_val``)."""
    bar = tqdm(unit="tok", unit_scale=True, disable=None if progress else True,
               desc="tokenizing", smoothing=0.1)
    index = 0
    with bar:
        for chunk in encoded:
            for ids in chunk:
                full = val_tokens is not None and writers["val"].tokens >= val_tokens
                writers["val" if not full and is_val(index, val_fraction) else "train"].add(ids)
                index += 1
            bar.update(sum(ids.size for ids in chunk))
            bar.set_postfix(docs=f"{index:,}", refresh=False)


def _check_sizes(writers: dict[str, ShardWriter]) -> None:
    """Refuse a split too small to be of use (see ``MIN_SPLIT_TOKENS``)."""
    for split, writer in writers.items():
        if writer.tokens < MIN_SPLIT_TOKENS:
            raise InputError(f"the {split} split would hold {writer.tokens:,} tokens "
                             f"({writer.docs:,} documents), fewer than the minimum of "
                             f"{MIN_SPLIT_TOKENS:,} (one GPT-2 window); give more text"
                             f"{' or raise --val_fraction' if split == 'val' else ''}")


# ----------------------------------------------------------------------------- bundled corpora


def bundled_corpus() -> Traversable:
    """The Tiny Shakespeare text shipped inside the package."""
    return resources.files("jaxgpt2").joinpath("assets/tinyshakespeare.txt")


def ensure_bundled(name: str, cache_dir: str | Path) -> Path:
    """Prepare a bundled corpus (shipped in the package) into ``cache_dir/name`` once."""
    out = Path(cache_dir) / name
    if not (out / "meta.json").exists():
        with resources.as_file(bundled_corpus()) as path:
            prepare([path], out, tokenizer=BUNDLED[name])
    return out


# ----------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit status (1 with ``error: ...`` for bad input)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("inputs", nargs="+", help="files, folders or glob patterns")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--tokenizer", choices=("gpt2", "char"), default="gpt2")
    parser.add_argument("--val_fraction", type=float, default=0.1,
                        help="share of documents (of characters, for one document) held out")
    parser.add_argument("--val_tokens", type=int, help="stop adding to val at this many tokens")
    parser.add_argument("--text_field", default="text", help="JSON field / parquet column")
    parser.add_argument("--workers", type=int, help="tokenizing threads (default: all cores)")
    parser.add_argument("--shard_tokens", type=int, default=SHARD_TOKENS, help="tokens per file")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a corpus already in --out, once the new one is complete")
    args = parser.parse_args(argv)

    def prepare_and_report() -> None:
        start = time.perf_counter()
        meta = prepare(args.inputs, args.out, args.tokenizer, args.val_fraction,
                       val_tokens=args.val_tokens, text_field=args.text_field,
                       workers=args.workers, shard_tokens=args.shard_tokens,
                       overwrite=args.overwrite, progress=True)
        seconds = time.perf_counter() - start
        tokens = meta["train_tokens"] + meta["val_tokens"]
        shards = len(meta["train_shards"]) + len(meta["val_shards"])
        print(f"wrote {args.out}: {meta['train_tokens']:,} train and {meta['val_tokens']:,} "
              f"val tokens ({meta['tokenizer']}, vocab {meta['vocab_size']}) in {shards} "
              f"file(s), {seconds:.1f} s, {tokens / seconds:,.0f} tokens/s")

    return report_errors(prepare_and_report)


if __name__ == "__main__":
    sys.exit(main())
