"""Next-token cross-entropy from logits, as XLA computes it (``model.kernels=xla``).

The fused kernel path (``jaxgpt2.kernels.cross_entropy``) computes the same loss from
the final hidden states; ``GPT.token_nll`` picks between them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def masked_sum(nll: jax.Array, loss_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Summed loss over real targets (``loss_mask`` 1) and their count, in float32."""
    mask = loss_mask.astype(jnp.float32)
    return jnp.sum(nll * mask), jnp.sum(mask)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def token_nll(padded_logits: jax.Array, targets: jax.Array, vocab_size: int) -> jax.Array:
    """Per-position negative log-likelihood (float32) of ``targets``.

    Logits may arrive in bfloat16; the log-sum-exp runs in float32 and the padded
    vocabulary columns are excluded, so they are never predicted. Written with its own
    gradient, ``softmax - onehot``, computed from the logits in their own dtype:
    differentiating the float32 log-sum-exp instead would keep a float32 copy of all the
    logits for the backward pass (``docs/performance.md``, "Why the code is shaped this
    way").
    """
    return _token_nll_fwd(padded_logits, targets, vocab_size)[0]


def _masked_f32(padded_logits: jax.Array, vocab_size: int) -> jax.Array:
    columns = jnp.arange(padded_logits.shape[-1])
    return jnp.where(columns < vocab_size, padded_logits.astype(jnp.float32), -jnp.inf)


def _token_nll_fwd(padded_logits, targets, vocab_size):
    log_z = jax.nn.logsumexp(_masked_f32(padded_logits, vocab_size), axis=-1)
    target_logit = jnp.take_along_axis(padded_logits, targets[..., None], axis=-1)[..., 0]
    return log_z - target_logit.astype(jnp.float32), (padded_logits, targets, log_z)


def _token_nll_bwd(vocab_size, residuals, g):
    padded_logits, targets, log_z = residuals
    probs = jnp.exp(_masked_f32(padded_logits, vocab_size) - log_z[..., None])
    onehot = jnp.arange(padded_logits.shape[-1]) == targets[..., None]
    d_logits = (probs - onehot) * g[..., None]
    return d_logits.astype(padded_logits.dtype), None


token_nll.defvjp(_token_nll_fwd, _token_nll_bwd)
