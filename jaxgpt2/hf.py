"""Hugging Face GPT-2 checkpoints in and out: ``load_pretrained`` and ``save_pretrained``.

Why this module exists: OpenAI's GPT-2 weights (and most fine-tunes of them) are
distributed as Hugging Face folders, and a model trained here is most useful if
``transformers.GPT2LMHeadModel.from_pretrained`` can open it unchanged. Both directions
go through safetensors with the numpy framework, so neither torch nor pickle is ever
needed (a pickled ``pytorch_model.bin`` can run code when loaded; safetensors cannot).

The mapping is one to one because ``jaxgpt2.model`` uses Hugging Face's names and
HF's ``Conv1D`` stores its weight as (in, out), which is Flax's ``Dense`` kernel layout,
so nothing is transposed. The only reshaping is structural:

* the blocks ``h.0`` .. ``h.{n-1}`` are stacked on a leading layer axis under ``h``;
* ``wte`` is padded with zero rows from ``vocab_size`` to ``padded_vocab_size`` (and
  unpadded on save). Zero rows are never predicted: the model slices its logits back to
  ``vocab_size`` columns;
* LayerNorm ``weight`` is Flax's ``scale``; ``weight`` of a linear layer is ``kernel``.

This module knows the layout (names and shapes, ``param_shapes``) of a ``GPTConfig``
and nothing of Flax; ``jaxgpt2.model`` builds on it (``GPT.from_pretrained``), and a test
holds ``param_shapes`` against the model's own initialiser, so a drift in ``model.py``
fails loudly rather than producing a silently wrong model.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Iterator, Mapping

import jax
import ml_dtypes  # registers bfloat16 with numpy, so bf16 checkpoints load
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from jaxgpt2.config import GPTConfig
from jaxgpt2.errors import NotFoundError, WeightsError
from jaxgpt2.tokenizer import GPT2_EOT_ID

__all__ = ["load_pretrained", "save_pretrained", "hf_config_to_gpt", "gpt_to_hf_config"]

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"

# (HF name inside a block, path under params["h"]); order is HF's state_dict order, which
# is the order tensors are checked in (so "the first mismatch" is well defined).
_BLOCK_TENSORS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("ln_1.weight", ("ln_1", "scale")),
    ("ln_1.bias", ("ln_1", "bias")),
    ("attn.c_attn.weight", ("attn", "c_attn", "kernel")),
    ("attn.c_attn.bias", ("attn", "c_attn", "bias")),
    ("attn.c_proj.weight", ("attn", "c_proj", "kernel")),
    ("attn.c_proj.bias", ("attn", "c_proj", "bias")),
    ("ln_2.weight", ("ln_2", "scale")),
    ("ln_2.bias", ("ln_2", "bias")),
    ("mlp.c_fc.weight", ("mlp", "c_fc", "kernel")),
    ("mlp.c_fc.bias", ("mlp", "c_fc", "bias")),
    ("mlp.c_proj.weight", ("mlp", "c_proj", "kernel")),
    ("mlp.c_proj.bias", ("mlp", "c_proj", "bias")),
)
_EMBEDDINGS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("wte.weight", ("wte", "embedding")),
    ("wpe.weight", ("wpe", "embedding")),
)
_FINAL: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("ln_f.weight", ("ln_f", "scale")),
    ("ln_f.bias", ("ln_f", "bias")),
)
# Non-persistent buffers that older transformers versions saved (the causal mask and the
# masking constant); they carry no learned state.
_IGNORED_BUFFER = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")
_PREFIX = "transformer."
_GELU_TANH = ("gelu_new", "gelu_pytorch_tanh")


# ----------------------------------------------------------------------------- config


def hf_config_to_gpt(hf: Mapping[str, Any], source: str = CONFIG_NAME) -> GPTConfig:
    """Translate a transformers ``GPT2Config`` dict into a ``GPTConfig``.

    Only what ``jaxgpt2.model`` computes exactly is accepted: anything else (another
    epsilon, exact-erf GELU, a wider MLP, untied output head, cross-attention, per-layer
    attention scaling) would load without error yet compute a different function, so it
    is refused here, naming the key. Dropout is set to 0 (inference); fine-tuning code
    can ``dataclasses.replace`` it.
    """
    def bad(key: str, why: str) -> WeightsError:
        return WeightsError(f"{source}: {key}={hf.get(key)!r} {why}; jaxgpt2 computes GPT-2 "
                            "exactly as OpenAI defined it and cannot load this model faithfully")

    model_type = hf.get("model_type", "gpt2")
    if model_type != "gpt2":
        raise bad("model_type", "is not 'gpt2'")
    for key in ("n_layer", "n_head", "n_embd", "n_positions", "vocab_size"):
        if not isinstance(hf.get(key), int) or hf[key] <= 0:
            raise WeightsError(f"{source}: {key} must be a positive integer, got {hf.get(key)!r}")
    eps = hf.get("layer_norm_epsilon", 1e-5)
    if not math.isclose(float(eps), 1e-5, rel_tol=1e-6):
        raise bad("layer_norm_epsilon", "is not 1e-5 (model.py's LayerNorm epsilon)")
    if hf.get("activation_function", "gelu_new") not in _GELU_TANH:
        raise bad("activation_function", f"is not one of {', '.join(_GELU_TANH)} "
                  "(the tanh-approximate GELU that model.py uses)")
    n_inner = hf.get("n_inner")
    if n_inner is not None and n_inner != 4 * hf["n_embd"]:
        raise bad("n_inner", f"is not 4 * n_embd = {4 * hf['n_embd']}")
    if not hf.get("scale_attn_weights", True):
        raise bad("scale_attn_weights", "is false (model.py always scales by 1/sqrt(head_dim))")
    if hf.get("scale_attn_by_inverse_layer_idx", False):
        raise bad("scale_attn_by_inverse_layer_idx", "is true")
    if hf.get("add_cross_attention", False):
        raise bad("add_cross_attention", "is true")
    if not hf.get("tie_word_embeddings", True):
        raise bad("tie_word_embeddings", "is false (model.py ties lm_head to wte)")
    if hf["n_embd"] % hf["n_head"]:
        raise WeightsError(f"{source}: n_embd={hf['n_embd']} is not divisible by "
                           f"n_head={hf['n_head']}")
    # reorder_and_upcast_attn only changes where float32 is used; parameters are float32
    # here, so it does not change the function.
    return GPTConfig(vocab_size=hf["vocab_size"], block_size=hf["n_positions"],
                     n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"],
                     dropout=0.0, bias=True)


def gpt_to_hf_config(config: GPTConfig) -> dict[str, Any]:
    """A transformers ``GPT2Config`` dict for ``config`` (what ``config.json`` holds).

    Dropout probabilities are written as ``config.dropout`` for all three HF dropouts
    (this model has one). ``<|endoftext|>`` is written as bos/eos only when the vocabulary
    contains it (a GPT-2 BPE vocabulary); for other vocabularies they are left unset so
    transformers does not warn about out-of-range special tokens.
    """
    # <|endoftext|> is GPT-2's bos, eos and usual pad.
    special = GPT2_EOT_ID if config.vocab_size > GPT2_EOT_ID else None
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "activation_function": "gelu_new",
        "attn_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "resid_pdrop": config.dropout,
        "bos_token_id": special,
        "eos_token_id": special,
        "initializer_range": 0.02,
        "layer_norm_epsilon": 1e-05,
        "n_ctx": config.block_size,  # read by transformers < 4.x-era code; harmless now
        "n_embd": config.n_embd,
        "n_head": config.n_head,
        "n_inner": None,
        "n_layer": config.n_layer,
        "n_positions": config.block_size,
        "reorder_and_upcast_attn": False,
        "scale_attn_by_inverse_layer_idx": False,
        "scale_attn_weights": True,
        "summary_activation": None,
        "summary_first_dropout": 0.1,
        "summary_proj_to_labels": True,
        "summary_type": "cls_index",
        "summary_use_proj": True,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",  # transformers 4.x name
        "dtype": "float32",  # transformers 5.x name
        "use_cache": True,
        "vocab_size": config.vocab_size,
    }


# ----------------------------------------------------------------------------- layout


def param_shapes(config: GPTConfig) -> dict:
    """The shape of every parameter of a GPT-2 with ``config`` (biases on), keyed as
    ``jaxgpt2.model``'s params are: blocks stacked on a leading layer axis, ``wte``
    padded to ``padded_vocab_size`` rows. ``tests/test_hf.py`` holds this against the
    model's own parameter tree, so the two layouts cannot drift apart."""
    L, C = config.n_layer, config.n_embd
    dense = lambda n_in, n_out: {"kernel": (L, n_in, n_out), "bias": (L, n_out)}
    norm = lambda *layers: {"scale": (*layers, C), "bias": (*layers, C)}
    return {"wte": {"embedding": (config.padded_vocab_size, C)},
            "wpe": {"embedding": (config.block_size, C)},
            "h": {"ln_1": norm(L), "attn": {"c_attn": dense(C, 3 * C), "c_proj": dense(C, C)},
                  "ln_2": norm(L), "mlp": {"c_fc": dense(C, 4 * C), "c_proj": dense(4 * C, C)}},
            "ln_f": norm()}


def _zeros(shapes: Mapping) -> dict:
    return {k: _zeros(v) if isinstance(v, Mapping) else np.zeros(v, np.float32)
            for k, v in shapes.items()}


def _get(tree: Mapping, path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _tensor_specs(config: GPTConfig
                  ) -> Iterator[tuple[str, tuple[str, ...], int | None, tuple[int, ...]]]:
    """(HF name without prefix, param path, layer index or None, HF shape), in HF order.

    HF shapes are ``param_shapes`` without the layer axis, with ``wte`` unpadded to
    ``vocab_size`` rows.
    """
    expected = param_shapes(config)
    for name, path in _EMBEDDINGS:
        shape = _get(expected, path)
        if name == "wte.weight":
            shape = (config.vocab_size,) + shape[1:]
        yield name, path, None, shape
    for i in range(config.n_layer):
        for name, path in _BLOCK_TENSORS:
            yield f"h.{i}.{name}", ("h",) + path, i, _get(expected, ("h",) + path)[1:]
    for name, path in _FINAL:
        yield name, path, None, _get(expected, path)


# ----------------------------------------------------------------------------- load


def _resolve(path: str | os.PathLike) -> tuple[Path, list[Path]]:
    """(config.json, weight files) for a folder, a ``.safetensors`` file or an index."""
    path = Path(path)
    if path.is_dir():
        folder = path
        if (folder / WEIGHTS_NAME).is_file():
            weights = [folder / WEIGHTS_NAME]
        elif (folder / WEIGHTS_INDEX_NAME).is_file():
            weights = _index_shards(folder / WEIGHTS_INDEX_NAME)
        else:
            hint = (" (only a pickled pytorch_model.bin is there; convert it to safetensors "
                    "with transformers, jaxgpt2 never unpickles)"
                    if (folder / "pytorch_model.bin").exists() else "")
            raise NotFoundError(f"{folder}: no {WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME}{hint}")
    elif path.is_file():
        folder = path.parent
        weights = (_index_shards(path) if path.name.endswith(".index.json") else [path])
    else:
        raise NotFoundError(f"{path}: no such checkpoint folder or file")
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        raise NotFoundError(f"{config_path}: missing; a Hugging Face GPT-2 checkpoint needs "
                            f"its {CONFIG_NAME} beside the weights")
    return config_path, weights


def _open_weights(file: Path) -> Any:
    """``safe_open(file)`` for numpy. safetensors checks the header against the file size
    on open, so a truncated or corrupt file fails here; its ``SafetensorError`` is not a
    ``UserError`` (the tools would show a traceback) and does not name the file."""
    try:
        return safe_open(file, framework="numpy")
    except SafetensorError as err:
        raise WeightsError(f"{file} is not a readable safetensors file ({err}); re-download "
                           "or re-export it") from err


def read_json(file: Path) -> dict:
    """A JSON file of the folder; a damaged one is a ``WeightsError`` naming it (json's own
    error gives a line and column but not the file)."""
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise WeightsError(f"{file} is not valid JSON ({err}); re-download or re-export "
                           "the folder") from err


def _index_shards(index: Path) -> list[Path]:
    weight_map = read_json(index).get("weight_map", {})
    return [index.parent / name for name in dict.fromkeys(weight_map.values())]


def load_pretrained(path: str | os.PathLike) -> tuple[GPTConfig, dict]:
    """Read a Hugging Face GPT-2 checkpoint into ``(GPTConfig, params)``.

    ``path`` is a folder holding ``config.json`` and ``model.safetensors`` (or a sharded
    ``model.safetensors.index.json``), or the weights file itself with ``config.json``
    beside it. ``params`` is the plain nested dict ``GPT(config).apply`` takes, float32
    numpy arrays, blocks stacked on a leading layer axis and ``wte`` zero-padded to
    ``config.padded_vocab_size`` rows.

    Tensors are read one at a time into preallocated stacked arrays, so peak host memory
    is about one copy of the model (``load_file`` followed by stacking would need two).
    Names may carry the ``transformer.`` prefix (what ``GPT2LMHeadModel.save_pretrained``
    writes) or not (OpenAI's original conversion on the Hub). Raises ``WeightsError`` naming
    the missing tensors, the first tensor whose shape disagrees with ``config.json``,
    unexpected tensors, or an ``lm_head.weight`` that is not tied to ``wte``.
    """
    config_path, weight_files = _resolve(path)
    config = hf_config_to_gpt(read_json(config_path), str(config_path))

    # HF name without prefix -> (file, name as stored)
    stored: dict[str, tuple[Path, str]] = {}
    lm_head: tuple[Path, str] | None = None
    for file in weight_files:
        with _open_weights(file) as f:
            for key in f.keys():
                bare = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
                if bare == "lm_head.weight":
                    lm_head = (file, key)
                elif _IGNORED_BUFFER.fullmatch(bare):  # not attn.c_attn.bias!
                    continue
                else:
                    stored[bare] = (file, key)

    specs = list(_tensor_specs(config))
    known = {name for name, *_ in specs}
    missing = [name for name, *_ in specs if name not in stored]
    unexpected = sorted(name for name in stored if name not in known)
    where = ", ".join(str(f) for f in weight_files)
    if missing:
        shown = ", ".join(missing[:20]) + (f" and {len(missing) - 20} more"
                                           if len(missing) > 20 else "")
        raise WeightsError(f"{where}: missing {len(missing)} tensor(s) that {config_path} "
                           f"(n_layer={config.n_layer}) requires: {shown}")
    if unexpected:
        raise WeightsError(f"{where}: unexpected tensor(s) not part of a GPT-2 LM: "
                           f"{', '.join(unexpected[:20])}")

    params = _zeros(param_shapes(config))
    with contextlib.ExitStack() as stack:
        handles = {file: stack.enter_context(_open_weights(file))
                   for file in weight_files}
        for name, _, _, shape in specs:  # headers only: fail before reading any data
            file, key = stored[name]
            found = tuple(handles[file].get_slice(key).get_shape())
            if found != shape:
                raise WeightsError(f"{file}: tensor {key!r} has shape {found}, expected {shape} "
                                   f"from {config_path} (vocab_size={config.vocab_size}, "
                                   f"n_positions={config.block_size}, n_embd={config.n_embd})")
        for name, param_path, layer, shape in specs:
            file, key = stored[name]
            value = handles[file].get_tensor(key)
            if not np.issubdtype(value.dtype, np.floating) and value.dtype != ml_dtypes.bfloat16:
                raise WeightsError(f"{file}: tensor {key!r} has dtype {value.dtype}, "
                                   "expected a floating point type")
            target = _get(params, param_path)
            if layer is None:
                target[: shape[0]] = value  # wte: rows past vocab_size stay zero
            else:
                target[layer] = value
        if lm_head is not None:
            file, key = lm_head
            head = handles[file].get_tensor(key).astype(np.float32)
            wte = params["wte"]["embedding"][: config.vocab_size]
            if head.shape != wte.shape or not np.array_equal(head, wte):
                raise WeightsError(f"{file}: {key!r} differs from wte.weight; jaxgpt2 ties the "
                                   "output head to the token embedding and cannot load an "
                                   "untied head")
    return config, params


# ----------------------------------------------------------------------------- save


def save_pretrained(config: GPTConfig, params: Mapping, path: str | os.PathLike) -> Path:
    """Write ``params`` as a Hugging Face GPT-2 folder; returns the folder.

    The folder holds ``config.json`` and ``model.safetensors`` with the names, layout and
    ``{"format": "pt"}`` metadata that ``GPT2LMHeadModel.save_pretrained`` writes
    (``transformer.``-prefixed, no ``lm_head.weight`` because it is tied, no attention
    mask buffers), so ``GPT2LMHeadModel.from_pretrained(path)`` loads it unchanged and
    without warnings. ``wte`` is cut back to ``vocab_size`` rows. Parameters may be jax
    arrays (sharded ones are gathered to host) and are written as float32.

    Files are written under temporary names and renamed, so an interrupted save never
    leaves a truncated ``model.safetensors`` that looks valid.
    """
    if not config.bias:
        raise WeightsError("save_pretrained: this model has bias=False, but Hugging Face GPT-2 "
                           "has biases in every Linear and LayerNorm and cannot represent it; "
                           "train with model.bias=true to export to transformers")
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    params = jax.device_get(params)

    tensors: dict[str, np.ndarray] = {}
    for name, param_path, layer, shape in _tensor_specs(config):
        try:
            value = np.asarray(_get(params, param_path))
        except (KeyError, TypeError):
            raise WeightsError(f"save_pretrained: params has no {'.'.join(param_path)} "
                               f"(needed for {_PREFIX}{name})") from None
        value = value[: shape[0]] if layer is None else value[layer]
        if tuple(value.shape) != shape:
            raise WeightsError(f"save_pretrained: {'.'.join(param_path)} gives {_PREFIX}{name} "
                               f"shape {tuple(value.shape)}, expected {shape} for this config")
        tensors[_PREFIX + name] = np.ascontiguousarray(value, dtype=np.float32)

    weights = folder / WEIGHTS_NAME
    tmp = weights.with_name(weights.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, weights)
    cfg = folder / CONFIG_NAME
    tmp = cfg.with_name(cfg.name + ".tmp")
    tmp.write_text(json.dumps(gpt_to_hf_config(config), indent=2, sort_keys=True) + "\n")
    os.replace(tmp, cfg)
    return folder
