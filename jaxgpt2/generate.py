"""Autoregressive sampling: temperature, top-k, top-p, greedy at temperature 0.

Only the real vocabulary is ever sampled: the model returns logits over
``config.vocab_size`` columns, never the padded ones.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from jaxgpt2.model import GPT


def sample_logits(logits: jax.Array, rng: jax.Array, temperature: float,
                  top_k: int | None, top_p: float | None) -> jax.Array:
    """Pick one token id per row of (B, V) float32 logits."""
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


@partial(jax.jit, static_argnames=("model", "temperature", "top_k", "top_p"))
def _next_token(model: GPT, params, window: jax.Array, position: jax.Array, rng: jax.Array,
                temperature: float, top_k: int | None, top_p: float | None) -> jax.Array:
    logits = model.apply({"params": params}, window)
    last = jnp.take_along_axis(logits, position[None, None, None].repeat(window.shape[0], 0), axis=1)[:, 0]
    return sample_logits(last, rng, temperature, top_k, top_p)


def generate(model: GPT, params, prompt_ids: np.ndarray, max_new_tokens: int,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             seed: int = 0) -> np.ndarray:
    """Extend each row of ``prompt_ids`` (B, P) by ``max_new_tokens`` sampled tokens.

    The context is the last ``block_size`` tokens (a sliding window, as nanoGPT does).
    """
    tokens = np.asarray(prompt_ids, dtype=np.int32)
    if tokens.ndim == 1:
        tokens = tokens[None]
    if tokens.shape[1] == 0:
        raise ValueError("the prompt must hold at least one token")
    vocab = model.config.vocab_size
    if tokens.min() < 0 or tokens.max() >= vocab:
        raise ValueError(f"prompt token ids must be in [0, {vocab}); got {tokens.min()}..{tokens.max()}")
    block = model.config.block_size
    rng = jax.random.PRNGKey(seed)
    for _ in range(max_new_tokens):
        context = tokens[:, -block:]
        length = context.shape[1]
        window = np.zeros((tokens.shape[0], block), np.int32)
        window[:, :length] = context
        rng, step_rng = jax.random.split(rng)
        nxt = _next_token(model, params, jnp.asarray(window), jnp.asarray(length - 1), step_rng,
                          temperature, top_k, top_p)
        tokens = np.concatenate([tokens, np.asarray(nxt, np.int32)[:, None]], axis=1)
    return tokens
