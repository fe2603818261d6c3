"""Generation: the KV cache against full recomputation and HF, and what sampling may pick."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt2.config import GPTConfig
from jaxgpt2.generate import _generate, generate, sample_logits
from jaxgpt2.hf import load_pretrained
from jaxgpt2.model import GPT, KVCache

GOLDEN = Path(__file__).resolve().parent / "golden"
GOLDEN_MODELS = sorted(p.name for p in GOLDEN.iterdir() if (p / "golden.npz").is_file())


@pytest.fixture(scope="module")
def sharp(small_model):
    """The small model with embeddings scaled up, so its next-token distributions are
    peaked but not one-hot (at init they are nearly uniform: every draw would be
    plausible; the top token then holds ~40% and the next few most of the rest)."""
    model, params = small_model
    params = jax.tree.map(np.array, params)
    params["wte"]["embedding"] *= 7.0
    return model, params


def prompts(batch: int, length: int, vocab: int = 100, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, (batch, length)).astype(np.int32)


# ----------------------------------------------------------------------------- the cache


@pytest.mark.parametrize("scan_layers", [True, False])
def test_decoding_in_chunks_matches_the_full_forward_pass(small_model, small_config, scan_layers):
    """Prefill 5 positions, then chunks of 1, 3 and 7: every position's logits equal the
    uncached model's, so the cache holds the right keys at the right positions."""
    _, params = small_model
    model = GPT(dataclasses.replace(small_config, scan_layers=scan_layers))
    decode = jax.jit(lambda ids, cache: model.apply({"params": params}, ids, cache,
                                                    method=GPT.decode))
    ids = prompts(2, 16, seed=1)
    full = np.asarray(jax.jit(model.apply)({"params": params}, ids))
    cache = KVCache.empty(small_config, 2)
    pieces = []
    for start, stop in [(0, 5), (5, 6), (6, 9), (9, 16)]:
        logits, cache = decode(ids[:, start:stop], cache)
        pieces.append(np.asarray(logits))
    assert int(cache.length) == 16
    np.testing.assert_allclose(np.concatenate(pieces, axis=1), full, atol=1e-5, rtol=0)


def test_cached_greedy_tokens_equal_uncached_ones_past_block_size(small_model, small_config):
    """5 + 30 tokens with block_size 16: the cache yields the first 12, the sliding window
    the rest; every token must equal full recomputation's."""
    model, params = small_model
    cached = generate(model, params, prompts(3, 5), 30, temperature=0.0)
    uncached = generate(model, params, prompts(3, 5), 30, temperature=0.0, use_cache=False)
    assert cached.shape == (3, 35) and small_config.block_size < 35
    np.testing.assert_array_equal(cached, uncached)


def test_cached_and_uncached_draw_the_same_samples_for_a_seed(sharp):
    model, params = sharp
    kwargs = dict(temperature=1.0, top_k=20, top_p=0.95, seed=5)
    cached = generate(model, params, prompts(4, 3), 13, **kwargs)
    uncached = generate(model, params, prompts(4, 3), 13, use_cache=False, **kwargs)
    np.testing.assert_array_equal(cached, uncached)


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("name", GOLDEN_MODELS)
def test_greedy_tokens_equal_hf_generate(name, use_cache):
    config, params = load_pretrained(GOLDEN / name)
    with np.load(GOLDEN / name / "golden.npz") as g:
        prompt, expected, n = g["gen_prompt"], g["gen_output"], int(g["gen_new_tokens"])
    with jax.default_matmul_precision("highest"):
        out = generate(GPT(config), params, prompt, n, temperature=0.0, use_cache=use_cache)
    np.testing.assert_array_equal(out, expected)


def test_a_prompt_longer_than_block_size_keeps_its_last_block(small_model):
    model, params = small_model
    long = prompts(2, 20, seed=2)
    out = generate(model, params, long, 4, temperature=0.0)
    np.testing.assert_array_equal(out[:, :20], long)
    np.testing.assert_array_equal(out, generate(model, params, long, 4, temperature=0.0,
                                                use_cache=False))
    # The first new token depends on the last 16 prompt tokens only.
    changed = long.copy()
    changed[:, :4] = (changed[:, :4] + 1) % 100
    assert (generate(model, params, changed, 1, temperature=0.0)[:, 20] == out[:, 20]).all()


# ----------------------------------------------------------------------------- sampling


def next_token_logits(model: GPT, params, out: np.ndarray, prompt_len: int) -> np.ndarray:
    """The uncached model's logits for each generated token of ``out``."""
    logits = np.asarray(jax.jit(model.apply)({"params": params}, out[:, :-1]), np.float64)
    return logits[:, prompt_len - 1:]


def test_top_k_draws_only_among_the_k_most_likely_tokens(sharp):
    model, params = sharp
    out = generate(model, params, prompts(8, 4), 12, temperature=2.0, top_k=3, seed=1)
    logits = next_token_logits(model, params, out, 4)
    picked = np.take_along_axis(logits, out[:, 4:, None], -1)
    rank = (logits > picked + 1e-5).sum(-1)  # tokens clearly more likely than the pick
    assert rank.max() < 3, f"a token outside the top 3 was drawn (rank {rank.max()})"
    assert (rank > 0).any(), "only argmax tokens drawn: sampling is not happening"


def test_top_p_draws_only_inside_the_nucleus(sharp):
    model, params = sharp
    top_p = 0.6
    out = generate(model, params, prompts(8, 4), 12, temperature=1.0, top_p=top_p, seed=2)
    logits = next_token_logits(model, params, out, 4)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    picked = np.take_along_axis(probs, out[:, 4:, None], -1)
    mass_above = np.where(probs > picked * (1 + 1e-5), probs, 0.0).sum(-1)
    assert mass_above.max() < top_p + 1e-5, \
        f"a token was drawn after tokens holding {mass_above.max():.3f} >= top_p={top_p}"
    assert (mass_above > 0).any(), "only argmax tokens drawn: sampling is not happening"


def test_padded_vocabulary_columns_are_never_sampled(small_model, small_config):
    """Every hidden state is made the all-ones vector and the padded embedding rows
    +10 each, so a padded column would have by far the largest logit (320)."""
    model, params = small_model
    params = jax.tree.map(np.array, params)
    params["ln_f"]["scale"] = np.zeros_like(params["ln_f"]["scale"])
    params["ln_f"]["bias"] = np.ones_like(params["ln_f"]["bias"])
    params["wte"]["embedding"][small_config.vocab_size:] = 10.0
    for use_cache, temperature in [(True, 0.0), (True, 5.0), (False, 5.0)]:
        out = generate(model, params, prompts(16, 2), 6, temperature=temperature,
                       use_cache=use_cache)
        assert out.max() < small_config.vocab_size, (use_cache, temperature)


def test_sample_logits_top_k_draws_exactly_the_top_k():
    logits = np.tile(np.log(np.arange(1, 51, dtype=np.float32)), (4000, 1))
    draws = np.asarray(sample_logits(logits, jax.random.PRNGKey(0), 1.0, 5, None))
    assert set(draws.tolist()) == {45, 46, 47, 48, 49}


@pytest.mark.parametrize("top_p, allowed", [(0.3, {0}), (0.75, {0, 1}), (0.9, {0, 1, 2})])
def test_sample_logits_top_p_keeps_the_smallest_set_reaching_p(top_p, allowed):
    logits = np.tile(np.log(np.array([0.5, 0.3, 0.15, 0.05], np.float32)), (4000, 1))
    draws = np.asarray(sample_logits(logits, jax.random.PRNGKey(1), 1.0, None, top_p))
    assert set(draws.tolist()) == allowed


def test_a_seed_fixes_the_samples_and_another_seed_changes_them(small_model):
    model, params = small_model
    a = generate(model, params, prompts(2, 3), 10, seed=3)
    np.testing.assert_array_equal(a, generate(model, params, prompts(2, 3), 10, seed=3))
    assert (a != generate(model, params, prompts(2, 3), 10, seed=4)).any()
    assert (a[0, 3:] != a[1, 3:]).any(), "rows of a batch must draw independently"


# ----------------------------------------------------------------------------- arguments


def test_zero_new_tokens_returns_the_prompt_and_one_dim_prompts_are_one_row(small_model):
    model, params = small_model
    np.testing.assert_array_equal(generate(model, params, [1, 2, 3], 0), [[1, 2, 3]])


@pytest.mark.parametrize("prompt, kwargs, match", [
    (np.zeros((1, 0), np.int32), {}, "at least one token"),
    ([[1, 100]], {}, r"in \[0, 100\)"),
    ([[1, 2]], {"temperature": -1.0}, "temperature"),
    ([[1, 2]], {"top_p": 0.0}, "top_p"),
    ([[1, 2]], {"top_k": -2}, "top_k"),
])
def test_bad_arguments_are_refused(small_model, prompt, kwargs, match):
    model, params = small_model
    with pytest.raises(ValueError, match=match):
        generate(model, params, prompt, 3, **kwargs)


def test_decode_loop_updates_the_cache_in_place():
    """A cache-sized copy inside the token loop costs a full read and write of every
    layer's keys and values per token (it halved batch-32 throughput on an H100)."""
    cfg = GPTConfig(vocab_size=256, block_size=128, n_layer=2, n_head=2, n_embd=64,
                    dtype="bfloat16", scan_layers=False)
    model = GPT(cfg)
    params = model.init_params(jax.random.PRNGKey(0))
    prompt = jnp.zeros((4, 8), jnp.int32)
    hlo = _generate.lower(model, params, prompt, jax.random.PRNGKey(0), 16, 16, 0.0,
                          None, None).compile().as_text()
    cache_shape = "bf16[2,4,128,2,32]"
    copies = [line for line in hlo.splitlines() if cache_shape in line and " copy(" in line]
    assert copies == []
