"""GPT-2 in Flax, exactly as OpenAI and Hugging Face define it.

Why Flax Linen rather than NNX: the trainer is a pure function of a parameter pytree
(jit with explicit shardings, orbax, safetensors, optax masks all take plain nested
dicts), and Linen's ``init``/``apply`` give exactly that with no graph traversal per call
and the same behaviour on the jax/flax versions we support. NNX's functional pattern
(``nnx.split`` once, ``nnx.merge`` inside ``jit``) would end in the same place with more
moving parts.

Layout: parameter names follow Hugging Face's GPT-2 (``wte``, ``wpe``, ``h``, ``ln_f``;
``attn.c_attn``, ``attn.c_proj``, ``mlp.c_fc``, ``mlp.c_proj``, ``ln_1``, ``ln_2``) and
Flax's ``Dense`` kernels are (in, out) like HF's Conv1D, so checkpoints map one to one.
The blocks' parameters are stacked on a leading layer axis under ``h``; they run either
under ``lax.scan`` (compile time independent of depth) or a Python loop over the same
stacked tree (faster on GPU), chosen by ``GPTConfig.scan_layers``.

Generation uses ``GPT.decode``: the same blocks and parameters, fed only the new
positions, with every layer's past keys and values kept in a ``KVCache``.
"""

from __future__ import annotations

import math
from pathlib import Path

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from jaxgpt2 import hf, loss
from jaxgpt2.config import PRESETS, GPTConfig, resolve_auto
from jaxgpt2.kernels.bias_gelu import bias_gelu
from jaxgpt2.kernels.cross_entropy import head_nll
from jaxgpt2.kernels.layer_norm import add_layer_norm
from jaxgpt2.kernels.layer_norm import layer_norm as kernel_layer_norm
from jaxgpt2.remat import remat_block

__all__ = ["GPT", "GPTConfig", "KVCache", "PRESETS", "compute_dtype"]


def compute_dtype(config: GPTConfig) -> jnp.dtype:
    """The dtype activations are computed in (``auto`` decided by ``config.resolve_auto``)."""
    return jnp.dtype(resolve_auto(config, jax.default_backend()).dtype)


def attention_implementation(config: GPTConfig) -> str:
    """``cudnn`` or ``xla`` (``auto`` decided by ``config.resolve_auto``)."""
    return resolve_auto(config, jax.default_backend()).attention


def uses_kernels(config: GPTConfig) -> bool:
    """Whether the layer norms, the MLP's bias + GELU and the loss run as the fused Pallas
    kernels (``model.kernels``)."""
    return resolve_auto(config, jax.default_backend(), jax.device_count()).kernels == "pallas"


def _init(std: float) -> nn.initializers.Initializer:
    return nn.initializers.normal(stddev=std)


@jax.custom_vjp
def linear(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """``x @ kernel`` over the last axis of ``x``, as one 2-D product of all its rows.

    Written with its own gradient, two 2-D products (``dx = g @ kernel.T``,
    ``dkernel = x.T @ g``): autodiff of the 3-D product contracts over batch and time,
    which XLA:CPU lowers to a transposed copy of the gradient fused into the GELU
    backward, 2.4 ms of a 65 ms CPU step per layer (``docs/performance.md``, "Why the
    code is shaped this way").
    """
    return _linear_fwd(x, kernel)[0]


def _linear_fwd(x, kernel):
    rows = x.reshape(-1, x.shape[-1])
    return jnp.dot(rows, kernel).reshape(*x.shape[:-1], kernel.shape[-1]), (x, kernel)


def _linear_bwd(residuals, g):
    x, kernel = residuals
    rows, g = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
    return jnp.dot(g, kernel.T).reshape(x.shape), jnp.dot(rows.T, g)


linear.defvjp(_linear_fwd, _linear_bwd)


class Dense(nn.Module):
    """``nn.Dense``'s parameters (``kernel`` (in, out), optional ``bias``) applied by
    ``linear``, in the compute dtype; with ``gelu``, followed by GPT-2's GELU (with
    ``fused``, bias and GELU through ``jaxgpt2.kernels.bias_gelu``). With ``defer_bias``
    it returns ``(x @ kernel, bias)`` (zeros without one) for the caller to add the bias
    in a kernel of its own."""

    features: int
    use_bias: bool
    dtype: jnp.dtype
    std: float = 0.02
    gelu: bool = False
    fused: bool = False
    defer_bias: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, input_bias: jax.Array | None = None
                 ) -> jax.Array | tuple[jax.Array, jax.Array]:
        """``x @ kernel + bias``; given ``input_bias`` (float32), ``(x + input_bias) @ kernel
        + bias``, that bias folded into the output's (``input_bias @ kernel`` in float32)."""
        kernel = self.param("kernel", _init(self.std), (x.shape[-1], self.features), jnp.float32)
        y = linear(x.astype(self.dtype), kernel.astype(self.dtype))
        bias = None
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
            if input_bias is not None:
                bias = bias + jnp.dot(input_bias, kernel, precision="highest")
            bias = bias.astype(self.dtype)
        if self.defer_bias:
            return y, jnp.zeros((self.features,), self.dtype) if bias is None else bias
        if bias is not None:
            if self.gelu and self.fused:
                rows = y.reshape(-1, self.features)
                return bias_gelu(rows, bias).reshape(y.shape)
            y = y + bias
        # GPT-2's "gelu_new" is the tanh approximation.
        return nn.gelu(y, approximate=True) if self.gelu else y


def _dense(config: GPTConfig, features: int, name: str, std: float = 0.02,
           gelu: bool = False, defer_bias: bool = False) -> Dense:
    return Dense(features, config.bias, compute_dtype(config), std, gelu,
                 uses_kernels(config), defer_bias, name=name)


class FusedLayerNorm(nn.Module):
    """``nn.LayerNorm``'s parameters (``scale``, optional ``bias``, float32) applied by the
    fused kernel (``jaxgpt2.kernels.layer_norm``), output in the compute dtype.

    Given a residual ``branch`` (and its bias), the input is ``x + branch + branch_bias``
    and the result ``(that sum, its normalisation)``, the add fused into the kernel; with
    ``copies`` > 1 the normalisation is a tuple of that many copies, one per consumer, so
    the kernel sums their gradients (``add_layer_norm``).
    """

    use_bias: bool
    dtype: jnp.dtype
    epsilon: float = 1e-5
    copies: int = 1

    @nn.compact
    def __call__(self, x: jax.Array, branch: jax.Array | None = None,
                 branch_bias: jax.Array | None = None):
        """``layer_norm(x)``, or ``(s, layer_norm(s))`` with ``s = x + branch + branch_bias``."""
        C = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones_init(), (C,), jnp.float32)
        bias = (self.param("bias", nn.initializers.zeros_init(), (C,), jnp.float32)
                if self.use_bias else jnp.zeros((C,), jnp.float32))
        if branch is None:
            y = kernel_layer_norm(x.reshape(-1, C), scale, bias, self.epsilon)
            return y.reshape(x.shape).astype(self.dtype)
        s, *ys = add_layer_norm(x.reshape(-1, C), branch.reshape(-1, C), branch_bias, scale,
                                bias, self.epsilon, self.copies)
        ys = tuple(y.reshape(x.shape).astype(self.dtype) for y in ys)
        return s.reshape(x.shape), ys[0] if self.copies == 1 else ys


def _layer_norm(config: GPTConfig, name: str, copies: int = 1) -> nn.Module:
    if uses_kernels(config):
        return FusedLayerNorm(config.bias, compute_dtype(config), copies=copies, name=name)
    # Flax computes the statistics in float32 even for bfloat16 inputs.
    return nn.LayerNorm(epsilon=1e-5, use_bias=config.bias, dtype=compute_dtype(config),
                        param_dtype=jnp.float32, name=name)


def _residual_std(config: GPTConfig) -> float:
    # Scaled init of residual projections, per the GPT-2 paper.
    return 0.02 / math.sqrt(2 * config.n_layer)


def unstack_layers(stacked: dict) -> list[dict]:
    """The stacked blocks' parameters as one tree per layer, each leaf split once
    (``jnp.unstack``): its gradient is one concatenate. Indexing layer by layer would
    make each layer's gradient a pad to the whole stack, and add the pads up."""
    leaves, treedef = jax.tree.flatten(stacked)
    return [treedef.unflatten(layer) for layer in zip(*map(jnp.unstack, leaves))]


def padding_mask(key_mask: jax.Array) -> jax.Array:
    """(B, 1, T, T) boolean mask from a (B, T) padding mask: real keys, plus each position
    itself. cuDNN needs the full query x key shape; the diagonal keeps a padding query
    (whose every key may be padding, under left padding) from a fully masked row, which
    could turn into NaN. Real queries are unaffected: they attend to themselves anyway."""
    T = key_mask.shape[-1]
    return (key_mask[:, None, None, :].astype(bool) | jnp.eye(T, dtype=bool)[None, None])


def attend(q: jax.Array, k: jax.Array, v: jax.Array, key_mask: jax.Array | None,
           config: GPTConfig, dropout_rng: jax.Array | None) -> jax.Array:
    """Causal attention over (B, T, H, D) inputs, optionally with a (B, T) key padding mask.

    cuDNN's fused kernel where it is chosen and no dropout is asked for; otherwise the
    attention written out (float32 scores and softmax, probabilities in the value dtype),
    which on XLA:CPU is also faster than ``jax.nn.dot_product_attention``'s XLA path
    (its softmax reduction alone cost 1 ms per layer of the CPU recipe's step).
    """
    mask = None if key_mask is None else padding_mask(key_mask)
    if dropout_rng is None and attention_implementation(config) == "cudnn":
        return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True,
                                            implementation="cudnn")
    T = q.shape[1]
    if q.dtype == jnp.float16:  # XLA:CPU has no float16 x float16 -> float32 product
        q, k = q.astype(jnp.float32), k.astype(jnp.float32)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k,
                        preferred_element_type=jnp.float32) / math.sqrt(q.shape[-1])
    allowed = jnp.tril(jnp.ones((T, T), bool))[None, None]
    if mask is not None:
        allowed = allowed & mask
    probs = jax.nn.softmax(jnp.where(allowed, scores, jnp.finfo(jnp.float32).min), axis=-1)
    if dropout_rng is not None:
        keep = jax.random.bernoulli(dropout_rng, 1.0 - config.dropout, probs.shape)
        probs = jnp.where(keep, probs / (1.0 - config.dropout), 0.0)
    return jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v)


def attend_cached(q: jax.Array, cache_k: jax.Array, cache_v: jax.Array,
                  start: jax.Array) -> jax.Array:
    """Causal attention of T new positions ``start .. start+T-1`` (B, T, H, D) over one
    layer's cache (B, S, H, D), which already holds their own keys and values.

    The math of ``jax.nn.dot_product_attention``'s XLA path (float32 scores and softmax,
    probabilities cast to the value dtype); cache slots past the last new position are
    masked, so what they hold does not matter.
    """
    T, S = q.shape[1], cache_k.shape[1]
    f32 = jnp.float32
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, cache_k, preferred_element_type=f32)
    scores = scores / math.sqrt(q.shape[-1])
    allowed = jnp.arange(S)[None, :] <= (start + jnp.arange(T))[:, None]
    probs = jax.nn.softmax(jnp.where(allowed, scores, jnp.finfo(f32).min), axis=-1)
    y = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(cache_v.dtype), cache_v,
                   preferred_element_type=f32)
    return y.astype(cache_v.dtype)


# Decoding state handed to one layer: the whole stacked cache (keys, values), the
# layer's index in it and the position of the first new token.
Past = tuple[jax.Array, jax.Array, jax.Array, jax.Array]


class QKVProjection(nn.Module):
    """GPT-2's ``c_attn`` (one (C, 3C) kernel and bias, Hugging Face's layout) applied as
    three products, one each for queries, keys and values. One wide product would need
    its output sliced into three copies and, in the backward pass, their gradients
    concatenated back (``docs/performance.md``, "Why the code is shaped this way").

    Returns ``(q, k, v, value_bias)``. Two of the three bias adds are left out, exactly:
    the key bias adds ``q . b_k``, one constant per query, to its scores, which the
    softmax cancels, so it is never added (its gradient is zero). With
    ``fold_value_bias``, the value bias is returned (float32) instead of added: each row
    of attention probabilities sums to one, so it passes through attention unchanged and
    ``c_proj`` folds it into its own bias. Otherwise ``value_bias`` is None.
    """

    config: GPTConfig
    fold_value_bias: bool = False

    @nn.compact
    def __call__(self, x: jax.Array | tuple[jax.Array, jax.Array]
                 ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array | None]:
        """``x``: the input, or two copies of it, one for the query and key products and
        one for the value product. XLA adds the first two products' input gradients in
        the second product's epilogue but needs a pass of its own for the third; with a
        copy of its own, the layer-norm kernel that made the input adds it as it reads it.
        """
        cfg = self.config
        xs = (x[0], x[0], x[1]) if isinstance(x, tuple) else (x,) * 3
        C, dtype = xs[0].shape[-1], compute_dtype(cfg)
        kernel = self.param("kernel", _init(0.02), (C, 3 * C), jnp.float32).astype(dtype)
        bias = (self.param("bias", nn.initializers.zeros_init(), (3 * C,), jnp.float32)
                if cfg.bias else None)
        q, k, v = (linear(xs[part].astype(dtype), kernel[:, part * C:(part + 1) * C])
                   for part in range(3))
        if bias is None:
            return q, k, v, None
        q = q + bias[:C].astype(dtype)
        if self.fold_value_bias:
            return q, k, v, bias[2 * C:]
        return q, k, v + bias[2 * C:].astype(dtype), None


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention.

    With ``past`` (decoding), ``x`` holds only the new positions: their keys and values
    are written into the stacked cache first, then attention reads this layer's slice of
    it, and the result is ``(y, (cache_k, cache_v))``. Writing before reading leaves the
    old cache dead, so XLA updates it in place instead of copying it every token.
    """

    config: GPTConfig
    defer_bias: bool = False  # return c_proj's (output, bias) unadded, with no dropout

    @nn.compact
    def __call__(self, x: jax.Array | tuple[jax.Array, jax.Array], key_mask: jax.Array | None,
                 deterministic: bool, past: Past | None = None):
        """``x``: the input, or two copies of it (``QKVProjection``)."""
        cfg = self.config
        # Attention dropout rescales rows of probabilities, which then no longer sum to one.
        use_dropout = past is None and cfg.dropout > 0 and not deterministic
        *qkv, value_bias = QKVProjection(cfg, not use_dropout, name="c_attn")(x)
        B, T, C = qkv[0].shape
        q, k, v = (t.reshape(B, T, cfg.n_head, C // cfg.n_head) for t in qkv)
        if past is None:
            y = attend(q, k, v, key_mask, cfg, self.make_rng("dropout") if use_dropout else None)
        else:
            cache_k, cache_v, layer, start = past
            at = (layer, 0, start, 0, 0)
            cache_k = jax.lax.dynamic_update_slice(cache_k, k[None].astype(cache_k.dtype), at)
            cache_v = jax.lax.dynamic_update_slice(cache_v, v[None].astype(cache_v.dtype), at)
            y = attend_cached(q, cache_k[layer], cache_v[layer], start)
            k, v = cache_k, cache_v
        y = checkpoint_name(y.reshape(B, T, C), "attention_out")
        y = _dense(cfg, C, "c_proj", _residual_std(cfg), defer_bias=self.defer_bias)(y, value_bias)
        if not self.defer_bias:
            y = nn.Dropout(cfg.dropout)(y, deterministic=deterministic)
        return y if past is None else (y, (k, v))


class MLP(nn.Module):
    config: GPTConfig
    defer_bias: bool = False  # return c_proj's (output, bias) unadded, with no dropout

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool):
        cfg = self.config
        x = _dense(cfg, 4 * cfg.n_embd, "c_fc", gelu=True)(x)
        x = _dense(cfg, cfg.n_embd, "c_proj", _residual_std(cfg), defer_bias=self.defer_bias)(x)
        return x if self.defer_bias else nn.Dropout(cfg.dropout)(x, deterministic=deterministic)


# The residual stream as the blocks pass it on when the layer-norm kernels do the
# residual adds: the stream so far, and the last branch's output and bias, not yet added.
Stream = tuple[jax.Array, jax.Array, jax.Array]


def fuses_residuals(config: GPTConfig, deterministic: bool) -> bool:
    """Whether the residual adds run inside the layer-norm kernels: with the kernels on
    and no residual dropout, which would have to come between a branch and its add."""
    return uses_kernels(config) and (config.dropout == 0 or deterministic)


class Block(nn.Module):
    """A pre-LayerNorm transformer block; with ``past`` it returns ``(x, (cache_k,
    cache_v))`` as ``CausalSelfAttention`` does.

    Where ``fuses_residuals``, ``x`` is a ``Stream`` in and out: ``ln_1``'s kernel adds
    the previous block's MLP output, ``ln_2``'s the attention's, and this block's MLP
    output is handed on unadded, and ``ln_1`` hands attention two copies of its output
    (``QKVProjection`` says why).
    """

    config: GPTConfig

    @nn.compact
    def __call__(self, x: jax.Array | Stream, key_mask: jax.Array | None,
                 deterministic: bool, past: Past | None = None):
        cfg = self.config
        fuse = fuses_residuals(cfg, deterministic)
        ln_1, ln_2 = _layer_norm(cfg, "ln_1", copies=2), _layer_norm(cfg, "ln_2")
        x, normed = ln_1(*x) if fuse else (x, ln_1(x))
        y = CausalSelfAttention(cfg, fuse, name="attn")(normed, key_mask, deterministic, past)
        y, new_kv = (y, None) if past is None else y
        if fuse:
            x, normed = ln_2(x, *y)
        else:
            x = x + y
            normed = ln_2(x)
        y = MLP(cfg, fuse, name="mlp")(normed, deterministic)
        x = (x, *y) if fuse else x + y
        return x if past is None else (x, new_kv)


class Embedding(nn.Embed):
    """``nn.Embed`` whose lookups return float32 rows of the float32 table.

    ``nn.Embed`` casts the whole table to the compute dtype before gathering, which makes
    its gradient a bfloat16 scatter-add: on GPU the repeated ids of real text serialise
    it, and a frequent token's thousands of updates per batch are summed in bfloat16.
    Gathering float32 rows keeps that sum in float32 (the caller casts the embedded
    sequence once); ``attend``, the tied output head, still runs in the compute dtype.
    """

    def __call__(self, inputs: jax.Array) -> jax.Array:
        if not jnp.issubdtype(inputs.dtype, jnp.integer):
            raise ValueError(f"token ids must be integers, got {inputs.dtype}")
        return jnp.take(self.embedding, inputs, axis=0)


class KVCache(flax.struct.PyTreeNode):
    """Every layer's keys and values for the positions decoded so far (``GPT.decode``).

    ``k`` and ``v`` are (n_layer, B, block_size, n_head, head_dim) in the compute dtype;
    positions ``>= length`` hold nothing yet and are masked out. The size is fixed at
    ``block_size``, so every decode step has the same shapes and compiles once.
    """

    k: jax.Array
    v: jax.Array
    length: jax.Array  # int32 scalar: positions filled so far

    @classmethod
    def empty(cls, config: GPTConfig, batch_size: int) -> "KVCache":
        shape = (config.n_layer, batch_size, config.block_size, config.n_head,
                 config.n_embd // config.n_head)
        dtype = compute_dtype(config)  # two buffers, so a jitted step may donate both
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                   length=jnp.zeros((), jnp.int32))


class GPT(nn.Module):
    """GPT-2 language model: ``model.apply({'params': p}, ids, attention_mask)`` -> logits.

    ``attention_mask`` (B, T) marks real tokens with 1 and padding with 0; it is combined
    with the causal mask. Logits are float32 over the real vocabulary: the padded columns
    of the embedding (``padded_vocab_size``) are never returned, so never predicted.
    """

    config: GPTConfig

    def setup(self) -> None:
        cfg = self.config
        dtype = compute_dtype(cfg)
        self.wte = Embedding(cfg.padded_vocab_size, cfg.n_embd, dtype=dtype,
                             param_dtype=jnp.float32, embedding_init=_init(0.02))
        self.wpe = Embedding(cfg.block_size, cfg.n_embd, dtype=dtype,
                             param_dtype=jnp.float32, embedding_init=_init(0.02))
        self.h = self.param("h", self._init_blocks)
        self.ln_f = _layer_norm(cfg, "ln_f")
        self.drop = nn.Dropout(cfg.dropout)

    def _init_blocks(self, rng: jax.Array) -> dict:
        """Initialise every block independently and stack them on a leading layer axis."""
        block = Block(self.config, parent=None)
        sample = self._stream(jnp.zeros((1, 1, self.config.n_embd),
                                        compute_dtype(self.config)), True)
        init_one = lambda r: block.init(r, sample, None, True)["params"]
        return jax.vmap(init_one)(jax.random.split(rng, self.config.n_layer))

    def _embed(self, input_ids: jax.Array, positions: jax.Array) -> jax.Array:
        """Token plus position embeddings, summed in float32 and cast once."""
        return (self.wte(input_ids) + self.wpe(positions)).astype(compute_dtype(self.config))

    def _stream(self, x: jax.Array, deterministic: bool) -> jax.Array | Stream:
        """The blocks' input: ``x``, or where ``fuses_residuals`` a ``Stream`` with nothing
        yet to add."""
        if not fuses_residuals(self.config, deterministic):
            return x
        return x, jnp.zeros_like(x), jnp.zeros((x.shape[-1],), x.dtype)

    def _final_norm(self, x: jax.Array | Stream, deterministic: bool) -> jax.Array:
        """``ln_f`` over the blocks' output (adding the last MLP output where fused)."""
        return self.ln_f(*x)[1] if fuses_residuals(self.config, deterministic) else self.ln_f(x)

    def hidden_states(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                      deterministic: bool = True) -> jax.Array:
        """Final-LayerNorm outputs (B, T, n_embd) in the compute dtype."""
        cfg = self.config
        T = input_ids.shape[1]
        if T > cfg.block_size:
            raise ValueError(f"sequence length {T} exceeds model.block_size={cfg.block_size}")
        x = self.drop(self._embed(input_ids, jnp.arange(T)), deterministic=deterministic)
        x = self._stream(x, deterministic)

        block = Block(cfg, parent=None)
        use_dropout = cfg.dropout > 0 and not deterministic

        def run_block(x, params, rng):
            rngs = {"dropout": rng} if use_dropout else {}
            return block.apply({"params": params}, x, attention_mask, deterministic, rngs=rngs)

        run_block = remat_block(run_block, cfg.remat)
        rngs = (jax.random.split(self.make_rng("dropout"), cfg.n_layer) if use_dropout
                else jnp.zeros((cfg.n_layer,), jnp.uint32))
        if cfg.scan_layers:
            x, _ = jax.lax.scan(lambda x, layer: (run_block(x, *layer), None), x, (self.h, rngs))
        else:
            for params, rng in zip(unstack_layers(self.h), rngs):
                x = run_block(x, params, rng)
        return self._final_norm(x, deterministic)

    def token_nll(self, input_ids: jax.Array, targets: jax.Array,
                  attention_mask: jax.Array | None = None,
                  deterministic: bool = True) -> jax.Array:
        """Per-position negative log-likelihood (float32) of ``targets``: the fused head
        and loss kernel with ``model.kernels`` on, XLA's loss over the logits otherwise."""
        x = self.hidden_states(input_ids, attention_mask, deterministic)
        if not uses_kernels(self.config):
            return loss.token_nll(self.wte.attend(x), targets, self.config.vocab_size)
        rows = x.reshape(-1, x.shape[-1])
        nll = head_nll(rows, self.wte.embedding.astype(x.dtype), targets.reshape(-1),
                       self.config.vocab_size)
        return nll.reshape(targets.shape)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Float32 logits over the real vocabulary from final hidden states (tied head)."""
        return self.wte.attend(hidden)[..., : self.config.vocab_size].astype(jnp.float32)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 deterministic: bool = True) -> jax.Array:
        return self.logits(self.hidden_states(input_ids, attention_mask, deterministic))

    def decode(self, input_ids: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
        """Logits (B, T, vocab_size) for ``input_ids`` (B, T) at positions ``cache.length``
        onwards, attending to the cached positions, and the cache extended by T.

        One call with the whole prompt fills the cache (prefill); each later call with one
        token costs one position. The caller keeps ``cache.length + T <= block_size``: a
        traced length cannot be checked here, and past the end the position embedding
        reads NaN.
        """
        cfg = self.config
        start = cache.length
        x = self._stream(self._embed(input_ids, start + jnp.arange(input_ids.shape[1])), True)
        block = Block(cfg, parent=None)

        def run_block(x, params, cache_k, cache_v, layer):
            return block.apply({"params": params}, x, None, True, (cache_k, cache_v, layer, start))

        k, v = cache.k, cache.v
        if cfg.scan_layers:
            def body(carry, layer):
                x, k, v = carry
                params = jax.tree.map(lambda a: a[layer], self.h)
                x, (k, v) = run_block(x, params, k, v, layer)
                return (x, k, v), None
            (x, k, v), _ = jax.lax.scan(body, (x, k, v), jnp.arange(cfg.n_layer))
        else:
            for i in range(cfg.n_layer):
                x, (k, v) = run_block(x, jax.tree.map(lambda a: a[i], self.h), k, v, i)
        cache = KVCache(k=k, v=v, length=start + input_ids.shape[1])
        return self.logits(self._final_norm(x, True)), cache

    def init_params(self, rng: jax.Array) -> dict:
        """Fresh float32 parameters (a plain nested dict)."""
        ids = jnp.zeros((1, 1), jnp.int32)
        return self.init({"params": rng}, ids)["params"]

    @staticmethod
    def from_pretrained(path: str | Path) -> tuple["GPT", dict]:
        """``(model, params)`` from a Hugging Face GPT-2 folder (``jaxgpt2.hf.load_pretrained``)."""
        config, params = hf.load_pretrained(path)
        return GPT(config), params

    @nn.nowrap  # not a Flax method: a plain write of the given params
    def save_pretrained(self, params: dict, path: str | Path) -> Path:
        """Write ``params`` as a Hugging Face GPT-2 folder (``jaxgpt2.hf.save_pretrained``)."""
        return hf.save_pretrained(self.config, params, path)

