"""Loss and perplexity of a model on a prepared dataset.

    python -m jaxgpt2.evaluate --checkpoint <run dir | HF folder> --data <dataset> \\
        [--split val] [--batches N] [--batch_size B]

``--data`` is a bundled corpus name (``shakespeare_char``, ``shakespeare``; prepared under
``--cache_dir`` on first use) or a folder made by ``python -m jaxgpt2.prepare``.
Batches are the trainer's (``data.BatchSource``) and, for a run folder, the defaults are
the run's own evaluation settings (seed, batch size, ``eval_steps``, data mode), so on the
run's validation data this prints the ``val_loss`` the trainer logged at that step. For a
Hugging Face folder the defaults are 20 batches of 8 windows, seed 1337.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass

import jax

from jaxgpt2.cli import add_model_arguments
from jaxgpt2.errors import DataError, InputError, report_errors
from jaxgpt2.data import (STREAMS, BatchSource, Split, mean_loss, open_split,
                          read_meta, resolve_dataset_dir)
from jaxgpt2.load import Loaded, load
from jaxgpt2.model import GPT
from jaxgpt2.step import make_eval_step


@dataclass
class Result:
    loss: float
    perplexity: float
    tokens: int


def evaluate(model: GPT, params, split: Split, batches: int, batch_size: int,
             block_size: int, seed: int, stream: int, mode: str = "windows") -> Result:
    """Mean next-token loss over ``batches`` deterministic batches of ``split``."""
    source = BatchSource(split, mode, batch_size, block_size, 1, seed, stream)
    loss, count = mean_loss(jax.jit(make_eval_step(model)), params, source, batches)
    return Result(loss, math.exp(loss), int(count))


def check_tokenizers_agree(loaded: Loaded, data_meta: dict, where: str) -> None:
    """Refuse data tokenized differently from the model's training data: the loss would
    be computed, and be meaningless."""
    mine = loaded.tokenizer_meta
    if int(data_meta["vocab_size"]) > loaded.config.vocab_size:
        raise DataError(f"{where} has a vocabulary of {data_meta['vocab_size']}, larger than "
                        f"the model's {loaded.config.vocab_size}")
    if mine is None:
        return
    if (mine.get("tokenizer"), mine.get("chars")) != (data_meta.get("tokenizer"),
                                                      data_meta.get("chars")):
        raise DataError(f"{where} is tokenized with {data_meta.get('tokenizer')!r}"
                        f"{' (another character set)' if mine.get('tokenizer') == 'char' else ''}"
                        f", but the model with {mine.get('tokenizer')!r}; prepare the data with "
                        "the model's tokenizer")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser)
    parser.add_argument("--data", required=True, help="bundled dataset name or prepared folder")
    parser.add_argument("--cache_dir", default="data", help="where bundled datasets are prepared")
    parser.add_argument("--split", default="val", choices=tuple(STREAMS))
    parser.add_argument("--batches", type=int, help="default: the run's train.eval_steps, else 20")
    parser.add_argument("--batch_size", type=int, help="default: the run's data.batch_size, else 8")
    parser.add_argument("--block_size", type=int, help="default: the model's block_size")
    parser.add_argument("--seed", type=int, help="default: the run's train.seed, else 1337")
    parser.add_argument("--mode", choices=("windows", "padded"),
                        help="default: the run's data.mode, else windows")
    args = parser.parse_args(argv)
    return report_errors(lambda: print_evaluation(args))


def print_evaluation(args: argparse.Namespace) -> None:
    loaded = load(args.checkpoint, args.dtype)
    run = loaded.run_config or {}
    train, data = run.get("train", {}), run.get("data", {})
    for name in ("batches", "batch_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise InputError(f"--{name} must be >= 1, got {getattr(args, name)}")
    batches = args.batches or train.get("eval_steps") or 20
    batch_size = args.batch_size or data.get("batch_size", 8)
    seed = args.seed if args.seed is not None else train.get("seed", 1337)
    mode = args.mode or data.get("mode", "windows")
    block = args.block_size or loaded.config.block_size
    if not 0 < block <= loaded.config.block_size:
        raise InputError(f"--block_size must be in [1, {loaded.config.block_size}] "
                         f"(the model's block_size), got {block}")
    path = resolve_dataset_dir(args.data, args.cache_dir)
    meta = read_meta(path)
    check_tokenizers_agree(loaded, meta, str(path))
    split = open_split(path, args.split, meta, min_tokens=block + 1)
    result = evaluate(loaded.model, loaded.params, split, batches, batch_size, block,
                      seed, STREAMS[args.split], mode)
    print(f"{args.split} loss {result.loss:.4f}  perplexity {result.perplexity:.2f}  "
          f"({batches} batches x {batch_size} x {block} of {path}, "
          f"{result.tokens:,} tokens scored; {loaded.source})")


if __name__ == "__main__":
    sys.exit(main())
