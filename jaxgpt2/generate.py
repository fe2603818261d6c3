"""Autoregressive sampling with a key/value cache: temperature, top-k, top-p, greedy at 0.

The prompt runs through the model once (prefill) and every layer's keys and values are
kept in a ``KVCache`` of ``block_size`` positions; each new token then runs the model on
one position only. The whole generation is one jitted program (a ``lax.scan`` over the
new tokens), so the host dispatches once and fetches the tokens once.

Past ``block_size``: a GPT-2 cache cannot slide, because positions are learned absolute
embeddings added at the input, so shifting the window changes every cached key and
value. Once prompt plus new tokens reach ``block_size``, the remaining tokens come from
the uncached path over the last ``block_size`` tokens (nanoGPT's cropped context), at
the cost of a full forward pass each. ``use_cache=False`` runs that path for every token:
it is the reference the cached path is tested against and the baseline of
``bench_sampling.py``.

Token ``i`` is drawn with ``fold_in(PRNGKey(seed), i)`` on either path, so both draw the
same tokens for the same seed (barring float near-ties). Only the real vocabulary is
sampled: the model's logits have ``config.vocab_size`` columns, never the padded ones.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxgpt2.errors import InputError
from jaxgpt2.model import GPT, KVCache, compute_dtype

Picker = Callable[[jax.Array, int | jax.Array], jax.Array]


def sample_logits(logits: jax.Array, rng: jax.Array, temperature: float,
                  top_k: int | None, top_p: float | None) -> jax.Array:
    """Pick one token id per row of (B, V) float32 logits.

    Filters apply in Hugging Face's order: temperature, then top-k, then top-p (the
    smallest set of tokens whose probability reaches ``top_p``, always at least one).
    """
    if temperature == 0:
        return jnp.argmax(logits, axis=-1)
    logits = logits / temperature
    if top_k:
        kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p is not None and top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # Drop a token when the tokens ranked above it already cover top_p.
        drop_sorted = (jnp.cumsum(probs, axis=-1) - probs) >= top_p
        drop = jnp.zeros_like(drop_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(drop_sorted)
        logits = jnp.where(drop, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1)


def generate(model: GPT, params, prompt_ids: np.ndarray, max_new_tokens: int,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             seed: int = 0, use_cache: bool = True, vocab_limit: int | None = None) -> np.ndarray:
    """Extend each row of ``prompt_ids`` (B, P), or one prompt (P,), by ``max_new_tokens``
    tokens; returns (B, P + max_new_tokens) int32 ids, prompt included.

    ``temperature=0`` is greedy decoding; ``top_k`` of 0/None and ``top_p`` of 1/None
    disable those filters. Rows share the prompt length (pad nothing; sample several
    continuations of one prompt by repeating it). ``vocab_limit`` samples only ids below
    it: pass the tokenizer's size, since a model may have more rows than its tokenizer
    has tokens (``model.vocab_size`` set above the data's), and those ids cannot be
    decoded.
    """
    tokens, program = _program(model, prompt_ids, max_new_tokens, temperature, top_k, top_p,
                               use_cache, vocab_limit)
    if max_new_tokens == 0:
        return tokens
    new = _generate(model, params, jnp.asarray(tokens), jax.random.PRNGKey(seed), **program)
    return np.concatenate([tokens, np.asarray(new, np.int32)], axis=1)


def compile_generate(model: GPT, params, prompt_ids: np.ndarray, max_new_tokens: int,
                     temperature: float = 1.0, top_k: int | None = None,
                     top_p: float | None = None, use_cache: bool = True,
                     vocab_limit: int | None = None) -> None:
    """Compile what ``generate`` with these arguments runs, from the parameters' shapes
    (``jax.ShapeDtypeStruct`` leaves of host parameters), so that call finds it
    compiled (``jaxgpt2.ahead``)."""
    tokens, program = _program(model, prompt_ids, max_new_tokens, temperature, top_k, top_p,
                               use_cache, vocab_limit)
    if max_new_tokens:
        key = jax.eval_shape(lambda: jax.random.PRNGKey(0))
        _generate.lower(model, params, jax.ShapeDtypeStruct(tokens.shape, tokens.dtype), key,
                        **program).compile()


def _program(model: GPT, prompt_ids: np.ndarray, max_new_tokens: int, temperature: float,
             top_k: int | None, top_p: float | None, use_cache: bool,
             vocab_limit: int | None) -> tuple[np.ndarray, dict]:
    """The checked prompt, and ``_generate``'s static arguments."""
    tokens = _check_prompt(prompt_ids, model.config.vocab_size)
    top_k, top_p = _check_sampling(max_new_tokens, temperature, top_k, top_p)
    if vocab_limit is not None and not 0 < vocab_limit <= model.config.vocab_size:
        raise InputError(f"vocab_limit must be in [1, {model.config.vocab_size}] (the model's "
                         f"vocabulary), got {vocab_limit}")
    if vocab_limit == model.config.vocab_size:
        vocab_limit = None  # one compiled program for "no limit"
    room = model.config.block_size - tokens.shape[1] + 1  # tokens the cache can produce
    n_cached = min(max_new_tokens, max(room, 0)) if use_cache else 0
    return tokens, {"max_new_tokens": max_new_tokens, "n_cached": n_cached,
                    "temperature": float(temperature), "top_k": top_k, "top_p": top_p,
                    "vocab_limit": vocab_limit}


def _check_prompt(prompt_ids: np.ndarray, vocab: int) -> np.ndarray:
    tokens = np.asarray(prompt_ids)
    if tokens.ndim == 1:
        tokens = tokens[None]
    if tokens.ndim != 2 or tokens.shape[1] == 0:
        raise InputError(f"the prompt must be (batch, length) with at least one token; "
                         f"got shape {tokens.shape}")
    if not np.issubdtype(tokens.dtype, np.integer):
        raise InputError(f"prompt token ids must be integers, got {tokens.dtype}")
    if tokens.min() < 0 or tokens.max() >= vocab:
        raise InputError(f"prompt token ids must be in [0, {vocab}); got {tokens.min()}..{tokens.max()}")
    return tokens.astype(np.int32)


def _check_sampling(max_new_tokens: int, temperature: float, top_k: int | None,
                    top_p: float | None) -> tuple[int | None, float | None]:
    """Validate, and normalise the 'off' values so they share one compiled program."""
    if max_new_tokens < 0:
        raise InputError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise InputError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    if top_k is not None and top_k < 0:
        raise InputError(f"top_k must be >= 1 (or 0/None for no limit), got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise InputError(f"top_p must be in (0, 1], got {top_p}")
    return (top_k or None), (None if top_p is None or top_p >= 1.0 else float(top_p))


@partial(jax.jit, static_argnames=("model", "max_new_tokens", "n_cached", "temperature",
                                   "top_k", "top_p", "vocab_limit"))
def _generate(model: GPT, params, prompt: jax.Array, rng: jax.Array, max_new_tokens: int,
              n_cached: int, temperature: float, top_k: int | None,
              top_p: float | None, vocab_limit: int | None = None) -> jax.Array:
    """(B, max_new_tokens) new tokens: ``n_cached`` from the cache, the rest uncached."""
    params = weights_in_compute_dtype(params, compute_dtype(model.config))

    def pick(logits: jax.Array, i: int | jax.Array) -> jax.Array:
        return sample_logits(logits[:, :vocab_limit], jax.random.fold_in(rng, i),
                             temperature, top_k, top_p)

    tokens = prompt
    if n_cached:
        tokens = jnp.concatenate([tokens, _cached_tokens(model, params, prompt, n_cached, pick)], 1)
    if n_cached < max_new_tokens:
        tokens = jnp.concatenate([tokens, _windowed_tokens(
            model, params, tokens, max_new_tokens - n_cached, n_cached, pick)], 1)
    return tokens[:, prompt.shape[1]:]


def weights_in_compute_dtype(params: dict, dtype: jnp.dtype) -> dict:
    """Every parameter but LayerNorm's cast to the compute dtype, once, outside the token
    loop (else XLA converts the float32 weights again at every step, and reads twice the
    bytes). Dense, Embed and the tied head cast them to that dtype before use anyway, so
    the results are identical; Flax's LayerNorm multiplies its scale in float32, so LayerNorm
    parameters stay as they are."""
    def cast(path, leaf):
        is_norm = any(getattr(key, "key", "").startswith("ln_") for key in path)
        return leaf if is_norm else leaf.astype(dtype)
    return jax.tree_util.tree_map_with_path(cast, params)


def _cached_tokens(model: GPT, params, prompt: jax.Array, n: int, pick: Picker) -> jax.Array:
    """(B, n) tokens: prefill the prompt into an empty cache, then one position a step.
    Needs ``prompt length + n - 1 <= block_size`` (the last token is never fed back)."""
    cache = KVCache.empty(model.config, prompt.shape[0])
    logits, cache = model.apply({"params": params}, prompt, cache, method=GPT.decode)
    first = pick(logits[:, -1], 0)

    def step(carry, i):
        cache, token = carry
        logits, cache = model.apply({"params": params}, token[:, None], cache, method=GPT.decode)
        token = pick(logits[:, -1], i)
        return (cache, token), token

    _, rest = jax.lax.scan(step, (cache, first), jnp.arange(1, n))
    return jnp.concatenate([first[:, None], rest.T], axis=1)


def _windowed_tokens(model: GPT, params, tokens: jax.Array, n: int, first_index: int,
                     pick: Picker) -> jax.Array:
    """(B, n) tokens after ``tokens``, each from a full forward pass over the last
    ``block_size`` tokens (no cache). The window always has ``block_size`` columns, so
    one program serves every step; columns after the last real token are ignored by
    the causal mask."""
    block = model.config.block_size
    batch, length0 = tokens.shape
    buf = jnp.zeros((batch, max(length0 + n, block)), tokens.dtype).at[:, :length0].set(tokens)

    def step(i, buf):
        length = length0 + i
        start = jnp.maximum(length - block, 0)
        window = jax.lax.dynamic_slice_in_dim(buf, start, block, axis=1)
        hidden = model.apply({"params": params}, window, method=GPT.hidden_states)
        last = jax.lax.dynamic_index_in_dim(hidden, length - 1 - start, axis=1)
        logits = model.apply({"params": params}, last, method=GPT.logits)[:, 0]
        return jax.lax.dynamic_update_index_in_dim(
            buf, pick(logits, first_index + i).astype(buf.dtype), length, axis=1)

    return jax.lax.fori_loop(0, n, step, buf)[:, length0:length0 + n]
