"""How the inference tools (``sample.py``, ``jaxgpt2.evaluate``, ``jaxgpt2.export``) name a
model on the command line; their errors are reported by ``jaxgpt2.errors.report_errors``."""

from __future__ import annotations

import argparse
import typing

from jaxgpt2.config import Dtype


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``--checkpoint`` and ``--dtype``, as ``jaxgpt2.load.load`` takes them."""
    parser.add_argument("--checkpoint", required=True,
                        help="run folder (its latest checkpoint), <run>/checkpoints/<step>, "
                             "or a Hugging Face GPT-2 folder")
    parser.add_argument("--dtype", default="auto", choices=typing.get_args(Dtype),
                        help="compute dtype (auto: bfloat16 on GPU/TPU, float32 on CPU)")
