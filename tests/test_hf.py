"""Hugging Face GPT-2 interop: golden parity with transformers, and checkpoint round trips.

The golden fixtures in tests/golden/ were written by tests/make_golden.py (torch +
transformers, see its docstring); these tests need neither torch nor the network.
Parity is checked in float32 with XLA's highest matmul precision, so a GPU's TF32 cannot
blur a real layout bug into the tolerance.
"""

from __future__ import annotations

import json
import shutil
from functools import lru_cache
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file, save_file

from jaxgpt2.config import GPTConfig
from jaxgpt2.generate import generate
from jaxgpt2.hf import load_pretrained, save_pretrained
from jaxgpt2.model import GPT

GOLDEN = Path(__file__).resolve().parent / "golden"
MODELS = sorted(p.name for p in GOLDEN.iterdir() if (p / "golden.npz").is_file())
VARIANTS = ("full", "right", "left")
RTOL = 1e-5  # max |ours - HF| / max |HF| over the real (non-padding) positions

assert MODELS, f"no golden fixtures under {GOLDEN}; run tests/make_golden.py"


@lru_cache(maxsize=None)
def golden(name: str) -> tuple[GPTConfig, dict, dict, dict]:
    """(config, params, golden arrays, HF tensors as stored), loaded once per model."""
    config, params = load_pretrained(GOLDEN / name)
    with np.load(GOLDEN / name / "golden.npz", allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    return config, params, arrays, load_file(GOLDEN / name / "model.safetensors")


@lru_cache(maxsize=None)
def jitted(config: GPTConfig):
    model = GPT(config)
    logits = jax.jit(lambda p, ids, mask: model.apply({"params": p}, ids, mask))
    hidden = jax.jit(lambda p, ids, mask: model.apply({"params": p}, ids, mask,
                                                      method=GPT.hidden_states))
    return logits, hidden


def rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def assert_rel_close(ours, ref, what: str) -> float:
    err = rel_err(ours, ref)
    assert err < RTOL, f"{what}: relative error {err:.3e} >= {RTOL:.0e}"
    return err


def assert_trees_equal(a: dict, b: dict, what: str) -> None:
    la, lb = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_flatten_with_path(b)[0]
    assert [p for p, _ in la] == [p for p, _ in lb], f"{what}: parameter trees differ"
    for (path, x), (_, y) in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y),
                                      err_msg=f"{what}: {jax.tree_util.keystr(path)} differs")


# ----------------------------------------------------------------------------- loading


@pytest.mark.parametrize("name", MODELS)
def test_load_maps_every_hf_tensor_exactly(name):
    config, params, _, hf = golden(name)
    hf_config = json.loads((GOLDEN / name / "config.json").read_text())
    assert (config.n_layer, config.n_head, config.n_embd, config.block_size, config.vocab_size,
            config.bias) == (hf_config["n_layer"], hf_config["n_head"], hf_config["n_embd"],
                             hf_config["n_positions"], hf_config["vocab_size"], True)
    for leaf in jax.tree.leaves(params):
        assert leaf.dtype == np.float32

    t = lambda key: hf["transformer." + key]
    wte = params["wte"]["embedding"]
    assert wte.shape == (config.padded_vocab_size, config.n_embd)
    np.testing.assert_array_equal(wte[: config.vocab_size], t("wte.weight"))
    np.testing.assert_array_equal(wte[config.vocab_size:], 0, err_msg="wte padding rows not zero")
    np.testing.assert_array_equal(params["wpe"]["embedding"], t("wpe.weight"))
    np.testing.assert_array_equal(params["ln_f"]["scale"], t("ln_f.weight"))
    np.testing.assert_array_equal(params["ln_f"]["bias"], t("ln_f.bias"))
    h = params["h"]
    block = {"ln_1.weight": ("ln_1", "scale"), "ln_1.bias": ("ln_1", "bias"),
             "ln_2.weight": ("ln_2", "scale"), "ln_2.bias": ("ln_2", "bias")}
    for module, layer in [("attn", "c_attn"), ("attn", "c_proj"), ("mlp", "c_fc"),
                          ("mlp", "c_proj")]:
        block[f"{module}.{layer}.weight"] = (module, layer, "kernel")  # (in, out), no transpose
        block[f"{module}.{layer}.bias"] = (module, layer, "bias")
    for i in range(config.n_layer):
        for key, path in block.items():
            ours = h
            for part in path:
                ours = ours[part]
            np.testing.assert_array_equal(ours[i], t(f"h.{i}.{key}"),
                                          err_msg=f"layer {i} {key} not mapped one to one")


def test_load_accepts_the_weights_file_path(tmp_path):
    name = MODELS[0]
    _, params, _, _ = golden(name)
    _, again = load_pretrained(GOLDEN / name / "model.safetensors")
    assert_trees_equal(again, params, "loaded from the .safetensors path")


def test_load_accepts_unprefixed_names_buffers_and_tied_lm_head(tmp_path):
    """OpenAI's conversion on the Hub has no ``transformer.`` prefix and older
    transformers saved the attention buffers and the (tied) lm_head."""
    name = MODELS[0]
    config, params, _, hf = golden(name)
    tensors = {k.removeprefix("transformer."): v for k, v in hf.items()}
    tensors["lm_head.weight"] = hf["transformer.wte.weight"]
    for i in range(config.n_layer):
        tensors[f"h.{i}.attn.bias"] = np.tril(np.ones((1, 1, 4, 4), np.float32))
        tensors[f"h.{i}.attn.masked_bias"] = np.array(-1e4, np.float32)
    _copy_with(tmp_path, name, tensors)
    _, again = load_pretrained(tmp_path)
    assert_trees_equal(again, params, "unprefixed checkpoint")


# ----------------------------------------------------------------------------- parity


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", MODELS)
def test_logits_match_hf_on_real_positions(name, variant):
    """full: no padding; right/left: padded with <|endoftext|> and masked. No position_ids
    were given to HF, so it used positions 0..T-1 per row, as GPT.__call__ does."""
    config, params, g, hf = golden(name)
    ids, mask = g[f"{variant}_input_ids"], g[f"{variant}_attention_mask"]
    real = mask.astype(bool)
    logits_fn, hidden_fn = jitted(config)
    with jax.default_matmul_precision("highest"):
        logits = np.asarray(logits_fn(params, ids, mask))
        hidden = np.asarray(hidden_fn(params, ids, mask))
    assert logits.shape == ids.shape + (config.vocab_size,) and logits.dtype == np.float32
    where = f"{name}/{variant}"

    errs = {"hidden": assert_rel_close(hidden[real], g[f"{variant}_hidden"][real],
                                       f"{where}: final LayerNorm output vs HF")}
    cols = g["logit_cols"]
    errs["logits@cols"] = assert_rel_close(logits[real][:, cols],
                                           g[f"{variant}_logits_cols"][real],
                                           f"{where}: logits at {len(cols)} columns vs HF's")
    # Every column: HF's logits are its final hidden state times its (tied) wte.
    ref = g[f"{variant}_hidden"][real].astype(np.float64) @ hf["transformer.wte.weight"].T
    errs["logits"] = assert_rel_close(
        logits[real], ref, f"{where}: all {config.vocab_size} logits vs HF hidden @ wte.T")
    lse = np.logaddexp.reduce(logits[real].astype(np.float64), axis=-1)
    errs["logsumexp"] = assert_rel_close(lse, g[f"{variant}_logsumexp"][real],
                                         f"{where}: logsumexp over the vocabulary vs HF")
    # Argmax must agree unless HF's own top two are a float32 near-tie.
    hf_arg = g[f"{variant}_argmax"][real]
    ours_at_hf_arg = np.take_along_axis(logits[real], hf_arg[:, None], -1)[:, 0]
    gap = logits[real].max(-1) - ours_at_hf_arg
    bad = (logits[real].argmax(-1) != hf_arg) & (gap > 1e-4)
    assert not bad.any(), f"{where}: argmax differs from HF at {bad.sum()} real positions"
    print(f"\n{where}: max relative errors " + ", ".join(f"{k} {v:.2e}" for k, v in errs.items()))


@pytest.mark.parametrize("name", MODELS)
def test_greedy_generation_matches_hf_generate(name):
    config, params, g, _ = golden(name)
    with jax.default_matmul_precision("highest"):
        out = generate(GPT(config), params, g["gen_prompt"], int(g["gen_new_tokens"]),
                       temperature=0.0)
    np.testing.assert_array_equal(out, g["gen_output"], err_msg=(
        f"{name}: greedy tokens differ from HF generate (HF's smallest top-1/top-2 logit gap "
        f"was {float(g['gen_margin']):.3g}, so this is not a near tie)"))


# ----------------------------------------------------------------------------- saving


@pytest.mark.parametrize("name", MODELS)
def test_save_then_load_round_trips_exactly(tmp_path, name):
    config, params, _, hf = golden(name)
    save_pretrained(config, params, tmp_path)
    config2, params2 = load_pretrained(tmp_path)
    assert config2 == config
    assert_trees_equal(params2, params, "after save_pretrained -> load_pretrained")


@pytest.mark.parametrize("name", MODELS)
def test_save_writes_what_transformers_save_pretrained_writes(tmp_path, name):
    """Same tensor names, shapes, values and metadata as GPT2LMHeadModel.save_pretrained,
    and a config.json with the same architecture keys, so from_pretrained loads it as is."""
    config, params, _, hf = golden(name)
    save_pretrained(config, params, tmp_path)
    ours = load_file(tmp_path / "model.safetensors")
    assert sorted(ours) == sorted(hf), "tensor names differ from transformers' save_pretrained"
    for key in hf:
        assert ours[key].dtype == np.float32, key
        np.testing.assert_array_equal(ours[key], hf[key], err_msg=key)
    with safe_open(tmp_path / "model.safetensors", framework="numpy") as f:
        assert f.metadata() == {"format": "pt"}
    theirs = json.loads((GOLDEN / name / "config.json").read_text())
    written = json.loads((tmp_path / "config.json").read_text())
    for key in ("model_type", "architectures", "n_layer", "n_head", "n_embd", "n_positions",
                "vocab_size", "layer_norm_epsilon", "activation_function", "n_inner",
                "scale_attn_weights", "scale_attn_by_inverse_layer_idx",
                "reorder_and_upcast_attn", "tie_word_embeddings", "bos_token_id",
                "eos_token_id"):
        assert written[key] == theirs[key], \
            f"config.json {key}: {written[key]!r} != {theirs[key]!r}"
    assert written["n_ctx"] == theirs["n_positions"]


def test_save_refuses_models_without_biases(tmp_path):
    config = GPTConfig(vocab_size=64, block_size=8, n_layer=1, n_head=2, n_embd=8, bias=False)
    params = GPT(config).init_params(jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="bias=False"):
        save_pretrained(config, params, tmp_path)
    assert not (tmp_path / "model.safetensors").exists()


# ----------------------------------------------------------------------------- errors


def _copy_with(tmp_path: Path, name: str, tensors: dict, config: dict | None = None) -> None:
    shutil.copy(GOLDEN / name / "config.json", tmp_path / "config.json")
    if config is not None:
        (tmp_path / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})


def test_shape_mismatch_names_the_first_bad_tensor(tmp_path):
    name = MODELS[0]
    _, _, _, hf = golden(name)
    tensors = dict(hf)
    good = hf["transformer.h.1.mlp.c_fc.weight"]
    tensors["transformer.h.1.mlp.c_fc.weight"] = good[:, :-1].copy()
    tensors["transformer.ln_f.bias"] = hf["transformer.ln_f.bias"][:-1].copy()  # later one
    _copy_with(tmp_path, name, tensors)
    with pytest.raises(ValueError) as info:
        load_pretrained(tmp_path)
    msg = str(info.value)
    assert "transformer.h.1.mlp.c_fc.weight" in msg and "ln_f" not in msg, msg
    assert str(good.shape) in msg and str((good.shape[0], good.shape[1] - 1)) in msg, msg


def test_missing_tensors_are_named(tmp_path):
    name = MODELS[0]
    _, _, _, hf = golden(name)
    tensors = {k: v for k, v in hf.items()
               if k not in ("transformer.h.0.attn.c_attn.bias", "transformer.wpe.weight")}
    _copy_with(tmp_path, name, tensors)
    expected = r"missing 2 tensor\(s\).*wpe\.weight.*h\.0\.attn\.c_attn\.bias"  # HF order
    with pytest.raises(ValueError, match=expected):
        load_pretrained(tmp_path)


@pytest.mark.parametrize("keep", [0.0, 0.5])
def test_truncated_safetensors_is_a_value_error_naming_the_file(tmp_path, keep):
    """A download cut short: safetensors' own error is not a ValueError (so the tools
    would show a traceback) and does not name the file."""
    shutil.copytree(GOLDEN / MODELS[0], tmp_path / "model")
    weights = tmp_path / "model" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ValueError) as info:
        load_pretrained(tmp_path / "model")
    msg = str(info.value)
    assert msg.startswith(f"{weights} is not a readable safetensors file (Error while "
                          "deserializing header"), msg
    assert msg.endswith("); re-download or re-export it"), msg
    assert isinstance(info.value.__cause__, SafetensorError)


def test_untied_lm_head_is_refused(tmp_path):
    name = MODELS[0]
    _, _, _, hf = golden(name)
    tensors = dict(hf, **{"lm_head.weight": hf["transformer.wte.weight"] * 2})
    _copy_with(tmp_path, name, tensors)
    with pytest.raises(ValueError, match="lm_head.weight.*differs from wte"):
        load_pretrained(tmp_path)


@pytest.mark.parametrize("key, value, match", [
    ("layer_norm_epsilon", 1e-6, "layer_norm_epsilon"),
    ("activation_function", "gelu", "activation_function"),
    ("n_inner", 100, "n_inner"),
    ("tie_word_embeddings", False, "tie_word_embeddings"),
])
def test_configs_model_py_cannot_compute_are_refused(tmp_path, key, value, match):
    name = MODELS[0]
    hf_config = json.loads((GOLDEN / name / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**hf_config, key: value}))
    shutil.copy(GOLDEN / name / "model.safetensors", tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=match):
        load_pretrained(tmp_path)


def test_gelu_pytorch_tanh_is_accepted(tmp_path):
    name = MODELS[0]
    hf_config = json.loads((GOLDEN / name / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**hf_config,
                                                      "activation_function": "gelu_pytorch_tanh"}))
    shutil.copy(GOLDEN / name / "model.safetensors", tmp_path / "model.safetensors")
    config, _ = load_pretrained(tmp_path)
    assert config == golden(name)[0]


def test_a_damaged_config_json_is_a_value_error_naming_the_file(tmp_path):
    shutil.copytree(GOLDEN / MODELS[0], tmp_path / "model")
    config = tmp_path / "model" / "config.json"
    config.write_text(config.read_text()[:20])
    with pytest.raises(ValueError, match=rf"{config} is not valid JSON"):
        load_pretrained(tmp_path / "model")


@pytest.mark.parametrize("config", [GPTConfig(vocab_size=100, block_size=16, n_layer=2, n_head=2,
                                              n_embd=32),
                                    GPTConfig(n_layer=3, n_head=4, n_embd=8, block_size=32)])
def test_the_hf_layout_is_the_models_own_parameter_tree(config):
    """hf knows the layout without importing the model; this holds the two together."""
    from jaxgpt2.hf import param_shapes
    model_tree = jax.eval_shape(GPT(config).init_params, jax.random.PRNGKey(0))
    assert jax.tree.map(lambda x: tuple(x.shape), model_tree) == param_shapes(config)
