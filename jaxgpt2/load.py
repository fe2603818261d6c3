"""Open a trained model for inference: a run folder, one of its checkpoints, or a Hugging
Face GPT-2 folder.

``sample.py``, ``jaxgpt2.evaluate`` and ``jaxgpt2.export`` share this module, so a
``--checkpoint`` argument means the same thing to each of them:

* a run folder (``train.out_dir``): its latest checkpoint under ``checkpoints/``;
* a step folder (``<run>/checkpoints/<step>``): that checkpoint;
* a folder with ``config.json`` and ``model.safetensors``: a Hugging Face GPT-2.

From a run only the ``params`` subtree of the orbax ``state`` is read (the Adam moments
would double the memory and are of no use here), and the architecture and tokenizer come
from the checkpoint's ``meta``, so neither the data nor the config file are needed. Runs
are read through ``checkpoint.Checkpointer`` (read-only), so a damaged checkpoint is the
same ``CheckpointError``, naming the newest earlier step, here as when resuming. A
Hugging Face folder's tokenizer is GPT-2's BPE, unless ``export`` left a
``jaxgpt2_tokenizer.json`` beside the weights (a character vocabulary, say).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import jax

from jaxgpt2.checkpoint import Checkpointer, model_config
from jaxgpt2.config import GPTConfig, resolve_auto
from jaxgpt2.errors import InputError, NotFoundError
from jaxgpt2.hf import CONFIG_NAME, load_pretrained, read_json
from jaxgpt2.model import GPT
from jaxgpt2.tokenizer import GPT2_EOT_ID, GPT2Tokenizer, Tokenizer, tokenizer_from_meta

TOKENIZER_NAME = "jaxgpt2_tokenizer.json"
# What a Hugging Face GPT-2 folder without our tokenizer file is taken to use.
GPT2_TOKENIZER_META = {"tokenizer": "gpt2", "vocab_size": GPT2Tokenizer.vocab_size,
                       "eot_id": GPT2_EOT_ID}


@dataclass
class Loaded:
    """A model ready to run: its config, parameters and (when known) tokenizer."""

    config: GPTConfig
    params: dict
    tokenizer_meta: dict | None  # meta.json's tokenizer fields; None when unknown
    source: Path  # the step folder or Hugging Face folder actually read
    run_config: dict | None = None  # a run's resolved training config

    @property
    def model(self) -> GPT:
        return GPT(self.config)

    def tokenizer(self) -> Tokenizer:
        if self.tokenizer_meta is None:
            raise InputError(f"{self.source}: no tokenizer is known for this vocabulary of "
                             f"{self.config.vocab_size} (a Hugging Face folder without "
                             f"{TOKENIZER_NAME} and not GPT-2's 50257 tokens)")
        return tokenizer_from_meta(self.tokenizer_meta)


def load(path: str | Path, dtype: str = "auto") -> Loaded:
    """Load a run folder, a step folder or a Hugging Face folder (see the module docstring).

    ``dtype`` is the compute dtype to run in (``auto``: bfloat16 on GPU/TPU, float32 on
    CPU); the attention implementation and the kernels are chosen again for this machine,
    so a run trained with cuDNN attention and fused kernels on a GPU still opens on a CPU.
    """
    path = Path(path).absolute()  # orbax reads absolute paths only
    if (path / CONFIG_NAME).is_file():
        loaded = _load_hf(path)
    else:
        loaded = _load_run(path)
    loaded.config = resolve_auto(dataclasses.replace(loaded.config, dtype=dtype,
                                                     attention="auto", kernels="auto",
                                                     remat="none"),
                                 jax.default_backend(), jax.device_count())
    loaded.config.validate()
    return loaded


def _load_hf(folder: Path) -> Loaded:
    config, params = load_pretrained(folder)
    sidecar = folder / TOKENIZER_NAME
    if sidecar.is_file():
        tokenizer_meta = read_json(sidecar)
    else:
        tokenizer_meta = GPT2_TOKENIZER_META if config.vocab_size == GPT2Tokenizer.vocab_size else None
    return Loaded(config, params, tokenizer_meta, folder)


def _open_run(path: Path) -> tuple[Checkpointer, int]:
    """The checkpoints folder (read-only) and step that a run folder, its
    ``checkpoints/`` or a step folder points at: a run's latest finished checkpoint."""
    if path.name.isdigit() and (path / "state").is_dir():
        return Checkpointer(path.parent, read_only=True), int(path.name)
    directory = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    if directory.is_dir():
        checkpointer = Checkpointer(directory, read_only=True)
        step = checkpointer.latest_step()  # finished saves only: orbax renames on completion
        if step is not None:
            return checkpointer, step
        checkpointer.close()
    raise NotFoundError(
                        f"{path}: not a run folder with checkpoints, a checkpoint step folder, or a "
                        f"Hugging Face folder with {CONFIG_NAME}")


def _load_run(path: Path) -> Loaded:
    checkpointer, step = _open_run(path)
    try:
        source = checkpointer.directory / str(step)
        meta = checkpointer.read_meta(step)
        config = model_config(meta, source)
        abstract = jax.eval_shape(GPT(config).init_params, jax.random.PRNGKey(0))
        params = checkpointer.read_params(step, abstract)
    finally:
        checkpointer.close()
    return Loaded(config, params, meta.get("tokenizer"), source, meta["config"])
