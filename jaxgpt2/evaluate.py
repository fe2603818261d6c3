"""Loss and perplexity of a model on a prepared dataset, and its HellaSwag accuracy.

    python -m jaxgpt2.evaluate --checkpoint <run dir | HF folder> --data <dataset> \\
        [--split val] [--batches N] [--batch_size B]
    python -m jaxgpt2.evaluate --checkpoint <run dir | HF folder> --hellaswag <file.jsonl> \\
        [--limit N] [--json]

``--data`` is a bundled corpus name (``shakespeare_char``, ``shakespeare``; prepared under
``--cache_dir`` on first use) or a folder made by ``python -m jaxgpt2.prepare``.
Batches are the trainer's (``data.BatchSource``) and, for a run folder, the defaults are
the run's own evaluation settings (seed, batch size, ``eval_steps``, data mode), so on the
run's validation data this prints the ``val_loss`` the trainer logged at that step. For a
Hugging Face folder the defaults are 20 batches of 8 windows, seed 1337.

``--hellaswag`` scores a HellaSwag JSONL file the user brings (``jaxgpt2.hellaswag``:
acc, acc_norm, as llm.c and build-nanogpt), ``--batch_size // 4`` examples a batch.
``--json`` prints one JSON object, keyed ``loss`` and/or ``hellaswag``, and nothing else
on stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass

import jax

from jaxgpt2.cli import add_model_arguments
from jaxgpt2.errors import DataError, InputError, report_errors
from jaxgpt2.data import (STREAMS, BatchSource, Split, mean_loss, open_split,
                          read_meta, resolve_dataset_dir)
from jaxgpt2.hellaswag import check_gpt2, crop_note, load_examples, make_score_step, score
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
    parser.add_argument("--data", help="bundled dataset name or prepared folder (the loss)")
    parser.add_argument("--cache_dir", default="data", help="where bundled datasets are prepared")
    parser.add_argument("--split", default="val", choices=tuple(STREAMS))
    parser.add_argument("--batches", type=int, help="default: the run's train.eval_steps, else 20")
    parser.add_argument("--batch_size", type=int,
                        help="rows a batch (HellaSwag: 4 per example); default: the run's "
                             "data.batch_size, else 8")
    parser.add_argument("--block_size", type=int, help="default: the model's block_size")
    parser.add_argument("--seed", type=int, help="default: the run's train.seed, else 1337")
    parser.add_argument("--mode", choices=("windows", "padded"),
                        help="default: the run's data.mode, else windows")
    parser.add_argument("--hellaswag", help="a HellaSwag JSONL file (e.g. hellaswag_val.jsonl) "
                                            "to score: acc and acc_norm")
    parser.add_argument("--limit", type=int, help="HellaSwag: score the first N examples only")
    parser.add_argument("--json", action="store_true",
                        help="print the results as one JSON object, and nothing else, on stdout")
    args = parser.parse_args(argv)
    if args.data is None and args.hellaswag is None:
        parser.error("give --data (loss and perplexity), --hellaswag (accuracy), or both")
    return report_errors(lambda: print_evaluation(args))


def print_evaluation(args: argparse.Namespace) -> None:
    for name in ("batches", "batch_size", "limit"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise InputError(f"--{name} must be >= 1, got {getattr(args, name)}")
    loaded = load(args.checkpoint, args.dtype)
    reports = {}
    if args.data is not None:
        reports["loss"] = loss_report(args, loaded)
    if args.hellaswag is not None:
        reports["hellaswag"] = hellaswag_report(args, loaded)
    if args.json:
        print(json.dumps({name: values for name, (values, _) in reports.items()}))
    else:
        for _, line in reports.values():
            print(line)


def block_size(args: argparse.Namespace, loaded: Loaded) -> int:
    """``--block_size``, checked against the model's, or the model's own."""
    block = args.block_size or loaded.config.block_size
    if not 0 < block <= loaded.config.block_size:
        raise InputError(f"--block_size must be in [1, {loaded.config.block_size}] "
                         f"(the model's block_size), got {block}")
    return block


def batch_size(args: argparse.Namespace, loaded: Loaded) -> int:
    return args.batch_size or (loaded.run_config or {}).get("data", {}).get("batch_size", 8)


def loss_report(args: argparse.Namespace, loaded: Loaded) -> tuple[dict, str]:
    """The loss on ``--data`` as JSON values and as a line for people."""
    run = loaded.run_config or {}
    train, data = run.get("train", {}), run.get("data", {})
    batches, rows = args.batches or train.get("eval_steps") or 20, batch_size(args, loaded)
    seed = args.seed if args.seed is not None else train.get("seed", 1337)
    mode = args.mode or data.get("mode", "windows")
    block = block_size(args, loaded)
    path = resolve_dataset_dir(args.data, args.cache_dir)
    meta = read_meta(path)
    check_tokenizers_agree(loaded, meta, str(path))
    split = open_split(path, args.split, meta, min_tokens=block + 1)
    result = evaluate(loaded.model, loaded.params, split, batches, rows, block,
                      seed, STREAMS[args.split], mode)
    values = {"split": args.split, "loss": result.loss, "perplexity": result.perplexity,
              "tokens": result.tokens}
    return values, (f"{args.split} loss {result.loss:.4f}  perplexity {result.perplexity:.2f}  "
                    f"({batches} batches x {rows} x {block} of {path}, "
                    f"{result.tokens:,} tokens scored; {loaded.source})")


def hellaswag_report(args: argparse.Namespace, loaded: Loaded) -> tuple[dict, str]:
    """HellaSwag accuracies on ``--hellaswag`` as JSON values and as a line for people; a
    note on cut contexts goes to stderr, so ``--json`` output stays one object."""
    check_gpt2(loaded.tokenizer_meta, str(loaded.source))
    examples = load_examples(args.hellaswag, args.limit)
    block = block_size(args, loaded)
    if note := crop_note(examples, block):
        print(note, file=sys.stderr)
    scores = score(jax.jit(make_score_step(loaded.model)), loaded.params, examples, block,
                   max(1, batch_size(args, loaded) // 4))
    values = {"acc": scores.acc, "acc_norm": scores.acc_norm, "n": scores.n}
    return values, (f"hellaswag acc {scores.acc:.4f}  acc_norm {scores.acc_norm:.4f}  "
                    f"n {scores.n}  ({args.hellaswag}; {loaded.source})")


if __name__ == "__main__":
    sys.exit(main())
