"""Turn text into token files: ``python -m jaxgpt2.prepare INPUT... --out DIR``.

Inputs are text files (one document each), JSONL files (one document per line, in a
``text`` field) or folders of those. The output folder holds ``train.bin``/``val.bin``
(flat token ids, uint16 or uint32 as the vocabulary needs), ``train_docs.npy``/
``val_docs.npy`` (each document's start offset, for the padded-batch mode) and
``meta.json`` (tokenizer, vocabulary, token counts). ``meta.json`` is written last and
atomically, so a folder with one is complete.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Iterable

import numpy as np

from jaxgpt2.errors import InputError, NotFoundError, report_errors
from jaxgpt2.tokenizer import CharTokenizer, GPT2Tokenizer, Tokenizer

BUNDLED = {"shakespeare_char": "char", "shakespeare": "gpt2"}
TEXT_SUFFIXES = {".txt", ".md", ".text"}
JSONL_SUFFIXES = {".jsonl", ".json"}


def read_documents(inputs: Iterable[str | Path]) -> list[str]:
    """Every document under ``inputs``, in a stable (sorted) order."""
    docs: list[str] = []
    for item in inputs:
        path = Path(item)
        if not path.exists():
            raise NotFoundError(f"input {str(path)!r} does not exist")
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            if file.suffix in JSONL_SUFFIXES:
                docs.extend(_read_jsonl(file))
            elif file.suffix in TEXT_SUFFIXES or not path.is_dir():
                docs.append(_read_text(file))
    docs = [d for d in docs if d]
    if not docs:
        raise InputError(f"no text found in {[str(i) for i in inputs]}; expected .txt or "
                         ".jsonl files (JSONL lines need a 'text' field)")
    return docs


def _read_text(file: Path) -> str:
    """``file`` decoded as UTF-8. Python's own UnicodeDecodeError names a byte position
    but not the file, which is useless when a folder of thousands is being read."""
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise InputError(f"{file} is not UTF-8 text ({err}); inputs must be UTF-8: convert "
                         "it (e.g. `iconv -t utf-8`) or leave it out") from err


def _parse_jsonl_line(file: Path, lineno: int, line: str) -> object:
    """One JSONL line, parsed. json's own error says "line 1 column 1" of the line alone,
    so the file and its line number are added here."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as err:
        raise InputError(f"{file}:{lineno}: not valid JSON ({err}); each line must be a JSON "
                         "object with a string 'text' field") from err


def _read_jsonl(file: Path) -> list[str]:
    docs = []
    for lineno, line in enumerate(_read_text(file).splitlines(), 1):
        if not line.strip():
            continue
        record = _parse_jsonl_line(file, lineno, line)
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise InputError(f"{file}:{lineno}: each JSONL line must be an object with a "
                             "string 'text' field")
        docs.append(record["text"])
    return docs


def _check_val_fraction(val_fraction: float) -> None:
    """Both splits are written and training reads both, so a fraction of 0 (an empty
    ``val.bin``) or 1 (an empty ``train.bin``) only fails later, and more confusingly."""
    if not 0 < val_fraction < 1:
        raise InputError(f"--val_fraction must be between 0 and 1 (exclusive), got "
                         f"{val_fraction}; 0.1 (the default) holds out a tenth for validation")


def split_documents(docs: list[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """A single document is split by characters (nanoGPT's 90/10 on Tiny Shakespeare);
    several documents are split whole, the last ``val_fraction`` of them to validation.

    A split that would come out empty is refused here, naming the counts, rather than
    written as an empty token file that training refuses without saying why."""
    if len(docs) == 1:
        return _split_characters(docs[0], val_fraction)
    return _split_whole(docs, val_fraction)


def _split_characters(doc: str, val_fraction: float) -> tuple[list[str], list[str]]:
    """The first ``1 - val_fraction`` of the characters to train, the rest to val."""
    cut = int(len(doc) * (1 - val_fraction))
    if not 0 < cut < len(doc):
        empty = "train" if cut == 0 else "val"
        raise InputError(f"the only document has {len(doc)} character(s), and --val_fraction "
                         f"{val_fraction} of it leaves the {empty} split empty; give more text "
                         "or another --val_fraction")
    return [doc[:cut]], [doc[cut:]]


def _split_whole(docs: list[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """The last ``val_fraction`` of the documents (at least one) to val, the rest to train."""
    n_val = max(1, round(len(docs) * val_fraction))
    if n_val >= len(docs):
        raise InputError(f"--val_fraction {val_fraction} of {len(docs)} documents puts all "
                         f"{len(docs)} in the val split and none in train; lower "
                         "--val_fraction or give more documents")
    return docs[:-n_val], docs[-n_val:]


def encode_documents(docs: list[str], tokenizer: Tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """Concatenated ids (each document followed by ``<|endoftext|>`` when the tokenizer
    has one) and each document's start offset."""
    pieces, starts, offset = [], [], 0
    for doc in docs:
        ids = tokenizer.encode(doc)
        if tokenizer.eot_id is not None:
            ids.append(tokenizer.eot_id)
        starts.append(offset)
        offset += len(ids)
        pieces.append(np.asarray(ids, dtype=np.int64))
    return np.concatenate(pieces), np.asarray(starts, dtype=np.int64)


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def prepare(inputs: Iterable[str | Path], out_dir: str | Path, tokenizer: str = "gpt2",
            val_fraction: float = 0.1) -> dict:
    """Tokenize ``inputs`` into ``out_dir``; returns the ``meta.json`` contents."""
    out = Path(out_dir)
    if tokenizer not in ("gpt2", "char"):
        raise InputError(f"tokenizer must be 'gpt2' or 'char', got {tokenizer!r}")
    _check_val_fraction(val_fraction)  # before reading: a corpus can take a while
    docs = read_documents(inputs)
    splits = split_documents(docs, val_fraction)  # before anything is written
    tok: Tokenizer = GPT2Tokenizer() if tokenizer == "gpt2" else CharTokenizer.from_text("".join(docs))
    out.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(tok.vocab_size)
    meta: dict = {"tokenizer": tok.name, "vocab_size": tok.vocab_size, "dtype": dtype.name,
                  "eot_id": tok.eot_id}
    if isinstance(tok, CharTokenizer):
        meta["chars"] = tok.chars
    for split, split_docs in zip(("train", "val"), splits):
        ids, starts = encode_documents(split_docs, tok)
        ids.astype(dtype).tofile(out / f"{split}.bin")
        np.save(out / f"{split}_docs.npy", starts)
        meta[f"{split}_tokens"] = int(ids.size)
        meta[f"{split}_docs"] = int(starts.size)
    tmp = out / "meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, out / "meta.json")
    return meta


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


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit status (1 with ``error: ...`` for bad input)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("inputs", nargs="+", help="text/JSONL files or folders")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--tokenizer", choices=("gpt2", "char"), default="gpt2")
    parser.add_argument("--val_fraction", type=float, default=0.1)
    args = parser.parse_args(argv)

    def prepare_and_report() -> None:
        meta = prepare(args.inputs, args.out, args.tokenizer, args.val_fraction)
        print(f"wrote {args.out}: {meta['train_tokens']:,} train and {meta['val_tokens']:,} "
              f"val tokens ({meta['tokenizer']}, vocab {meta['vocab_size']})")

    return report_errors(prepare_and_report)


if __name__ == "__main__":
    sys.exit(main())
