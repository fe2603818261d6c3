"""Sample from a trained model: ``python sample.py --checkpoint <run dir | HF folder> --prompt "..."``.

``--checkpoint`` is a run folder (its latest checkpoint), a ``<run>/checkpoints/<step>``
folder or a Hugging Face GPT-2 folder (see ``jaxgpt2/load.py``). The samples are drawn as
one batch; each is printed whole (prompt included), followed by a separator line.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from jaxgpt2.cli import add_model_arguments
from jaxgpt2.errors import report_errors
from jaxgpt2.generate import generate
from jaxgpt2.load import load
from jaxgpt2.tokenizer import encode_prompt

SEPARATOR = "-" * 40


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser)
    parser.add_argument("--prompt", default="\n",
                        help="text to continue; empty starts from <|endoftext|> (GPT-2 BPE)")
    parser.add_argument("--max_new_tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 is greedy")
    parser.add_argument("--top_k", type=int, default=200, help="0 keeps every token")
    parser.add_argument("--top_p", type=float, default=1.0, help="1 keeps every token")
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--num_samples", type=int, default=1)
    parser.add_argument("--no_cache", action="store_true",
                        help="recompute the whole context for every token (slow; a reference)")
    args = parser.parse_args(argv)
    if args.num_samples < 1:
        parser.error("--num_samples must be >= 1")
    return report_errors(lambda: print_samples(args))


def print_samples(args: argparse.Namespace) -> None:
    loaded = load(args.checkpoint, args.dtype)
    tokenizer = loaded.tokenizer()
    ids = encode_prompt(tokenizer, args.prompt)
    out = generate(loaded.model, loaded.params, np.tile(ids, (args.num_samples, 1)),
                   args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                   args.seed, use_cache=not args.no_cache,
                   vocab_limit=min(tokenizer.vocab_size, loaded.config.vocab_size))
    for row in out:
        print(tokenizer.decode(row.tolist()))
        print(SEPARATOR)


if __name__ == "__main__":
    sys.exit(main())
