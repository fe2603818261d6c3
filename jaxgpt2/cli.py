"""What the inference tools (``sample.py``, ``jaxgpt2.evaluate``, ``jaxgpt2.export``) share:
how a model is named on the command line, and how a user's mistake is reported.

A mistake the user can fix (a wrong path, a damaged checkpoint, a prompt outside the
vocabulary, data in another tokenization) prints ``error: <what and the fix>`` and exits
with status 1, without a traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from jaxgpt2.checkpoint import CheckpointError

# ConfigError, DataError and the tokenizers' complaints are ValueErrors.
USER_ERRORS: tuple[type[Exception], ...] = (ValueError, FileNotFoundError, CheckpointError)
DTYPES = ("auto", "float32", "bfloat16", "float16")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``--checkpoint`` and ``--dtype``, as ``jaxgpt2.load.load`` takes them."""
    parser.add_argument("--checkpoint", required=True,
                        help="run folder (its latest checkpoint), <run>/checkpoints/<step>, "
                             "or a Hugging Face GPT-2 folder")
    parser.add_argument("--dtype", default="auto", choices=DTYPES,
                        help="compute dtype (auto: bfloat16 on GPU/TPU, float32 on CPU)")


def run_tool(body: Callable[[], None]) -> int:
    """Run a tool's ``body``: exit status 0 when it returns, 1 with the message on stderr
    when it raises one of ``USER_ERRORS``."""
    try:
        body()
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0
