"""Write a run's checkpoint as a Hugging Face GPT-2 folder.

    python -m jaxgpt2.export <run dir | step folder> <out dir>

The folder is what ``transformers.GPT2LMHeadModel.from_pretrained`` opens (written by
``jaxgpt2.hf.save_pretrained``: ``config.json`` + ``model.safetensors``, float32). The
run's tokenizer is written beside it as ``jaxgpt2_tokenizer.json``, so ``sample.py`` and
``jaxgpt2.evaluate`` can use the exported folder with a character vocabulary too;
transformers ignores that file. Models trained with ``model.bias=false`` cannot be
exported: Hugging Face's GPT-2 has no bias-free variant.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from jaxgpt2.errors import report_errors
from jaxgpt2.hf import save_pretrained
from jaxgpt2.load import TOKENIZER_NAME, load


def export(checkpoint: str | Path, out_dir: str | Path) -> Path:
    """Export ``checkpoint`` (anything ``jaxgpt2.load.load`` opens) to ``out_dir``."""
    loaded = load(checkpoint, dtype="float32")
    folder = save_pretrained(loaded.config, loaded.params, out_dir)
    if loaded.tokenizer_meta is not None:
        sidecar = folder / TOKENIZER_NAME
        tmp = sidecar.with_name(sidecar.name + ".tmp")
        tmp.write_text(json.dumps(loaded.tokenizer_meta, indent=1) + "\n")
        os.replace(tmp, sidecar)
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="run folder or <run>/checkpoints/<step>")
    parser.add_argument("out_dir", help="folder to write (created if missing)")
    args = parser.parse_args(argv)

    def export_and_report() -> None:
        folder = export(args.checkpoint, args.out_dir)
        print(f"wrote {folder} (load with transformers.GPT2LMHeadModel.from_pretrained)")

    return report_errors(export_and_report)


if __name__ == "__main__":
    sys.exit(main())
