"""The model: causality, padding, vocabulary padding, layer loop vs scan, init scale."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt2.loss import masked_sum, token_nll
from jaxgpt2.model import GPT, CausalSelfAttention, GPTConfig, attend


def cross_entropy_sum(logits, targets, loss_mask, vocab_size):
    return masked_sum(token_nll(jnp.asarray(logits), jnp.asarray(targets), vocab_size),
                      jnp.asarray(loss_mask))


def test_logits_at_t_ignore_tokens_after_t(small_model):
    model, params = small_model
    ids = np.random.default_rng(0).integers(0, 100, (2, 16))
    changed = ids.copy()
    changed[:, 9:] = (changed[:, 9:] + 7) % 100
    a = model.apply({"params": params}, ids)
    b = model.apply({"params": params}, changed)
    np.testing.assert_allclose(a[:, :9], b[:, :9], atol=1e-6)
    assert np.abs(a[:, 9:] - b[:, 9:]).max() > 1e-3, "later positions should see the change"


def test_right_padding_does_not_change_real_logits_or_loss(small_model, small_config):
    model, params = small_model
    rng = np.random.default_rng(1)
    lengths = [16, 11, 5]
    seqs = [rng.integers(0, 100, n + 1) for n in lengths]
    ids = np.zeros((3, 16), np.int32)
    targets = np.zeros((3, 16), np.int32)
    mask = np.zeros((3, 16), np.int32)
    for row, seq in enumerate(seqs):
        n = lengths[row]
        ids[row, :n], targets[row, :n], mask[row, :n] = seq[:-1], seq[1:], 1
    padded = model.apply({"params": params}, ids, mask)
    total = 0.0
    for row, seq in enumerate(seqs):
        n = lengths[row]
        alone = model.apply({"params": params}, seq[None, :-1])
        np.testing.assert_allclose(padded[row, :n], alone[0], atol=1e-5)
        total += float(cross_entropy_sum(alone, seq[None, 1:], np.ones((1, n)), 100)[0])
    loss_sum, count = cross_entropy_sum(padded, targets, mask, 100)
    assert count == sum(lengths)
    np.testing.assert_allclose(loss_sum, total, rtol=1e-5)


def test_padded_targets_do_not_move_the_loss():
    logits = jax.random.normal(jax.random.PRNGKey(2), (2, 8, 128))
    targets = np.random.default_rng(3).integers(0, 100, (2, 8))
    mask = np.ones((2, 8), np.float32)
    mask[1, 5:] = 0
    other = targets.copy()
    other[1, 5:] = (other[1, 5:] + 13) % 100
    a = cross_entropy_sum(logits, targets, mask, 100)
    b = cross_entropy_sum(logits, other, mask, 100)
    np.testing.assert_allclose(a[0], b[0], rtol=1e-6)
    assert float(a[1]) == 13.0


def test_padded_vocabulary_columns_are_never_returned_or_scored(small_model, small_config):
    model, params = small_model
    assert small_config.padded_vocab_size == 128
    assert params["wte"]["embedding"].shape == (128, 32)
    logits = model.apply({"params": params}, np.zeros((1, 4), np.int32))
    assert logits.shape[-1] == 100 and logits.dtype == jnp.float32
    # The loss normaliser ignores padded columns even if they hold huge logits.
    padded = jnp.zeros((1, 1, 128)).at[..., 100:].set(1e4)
    loss, _ = cross_entropy_sum(padded, np.zeros((1, 1), np.int32), np.ones((1, 1)), 100)
    np.testing.assert_allclose(loss, np.log(100.0), rtol=1e-6)


@pytest.mark.parametrize("remat", ["none", "full", "dots_saveable"])
def test_python_layer_loop_and_remat_match_scan(small_model, small_config, remat):
    model, params = small_model
    ids = np.random.default_rng(4).integers(0, 100, (2, 16))
    variant = GPT(dataclasses.replace(small_config, scan_layers=False, remat=remat))
    np.testing.assert_allclose(variant.apply({"params": params}, ids),
                               model.apply({"params": params}, ids), atol=1e-5)

    def loss(m, p):
        return cross_entropy_sum(m.apply({"params": p}, ids), ids, np.ones_like(ids), 100)[0]
    g_scan = jax.grad(lambda p: loss(model, p))(params)
    g_var = jax.grad(lambda p: loss(variant, p))(params)
    for a, b in zip(jax.tree.leaves(g_scan), jax.tree.leaves(g_var)):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_residual_projections_use_scaled_init():
    cfg = GPTConfig(n_layer=8, n_embd=256, n_head=4, block_size=8, vocab_size=256)
    params = GPT(cfg).init_params(jax.random.PRNGKey(5))
    std = lambda x: float(np.std(np.asarray(x)))
    assert abs(std(params["h"]["attn"]["c_attn"]["kernel"]) - 0.02) < 0.002
    expected = 0.02 / np.sqrt(2 * 8)
    assert abs(std(params["h"]["attn"]["c_proj"]["kernel"]) - expected) < 0.1 * expected
    assert abs(std(params["h"]["mlp"]["c_proj"]["kernel"]) - expected) < 0.1 * expected
    # Each layer is initialised independently, not copied.
    k = params["h"]["mlp"]["c_fc"]["kernel"]
    assert not np.allclose(k[0], k[1])


def test_dropout_is_active_only_in_training(small_config):
    cfg = dataclasses.replace(small_config, dropout=0.5)
    model = GPT(cfg)
    params = model.init_params(jax.random.PRNGKey(0))
    ids = np.arange(16)[None] % 100
    a = model.apply({"params": params}, ids)
    b = model.apply({"params": params}, ids)
    np.testing.assert_array_equal(a, b)
    c = model.apply({"params": params}, ids, deterministic=False, rngs={"dropout": jax.random.PRNGKey(1)})
    assert np.abs(np.asarray(c) - np.asarray(a)).max() > 1e-3


def _attention_with_every_bias(params, x, key_mask, config):
    """GPT-2's attention as written: one (C, 3C) product, all three biases added."""
    B, T, C = x.shape
    qkv = x @ params["c_attn"]["kernel"] + params["c_attn"]["bias"]
    q, k, v = (t.reshape(B, T, config.n_head, C // config.n_head) for t in jnp.split(qkv, 3, -1))
    y = attend(q, k, v, key_mask, config, None).reshape(B, T, C)
    return y @ params["c_proj"]["kernel"] + params["c_proj"]["bias"]


def test_attention_without_key_and_value_bias_adds_matches_every_bias_added(small_config):
    """The key bias left out and the value bias folded into c_proj's: the same output and
    the same gradients as adding all three, with large random biases and padding."""
    attention = CausalSelfAttention(small_config)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 16, 32)), jnp.float32)
    key_mask = np.ones((2, 16), bool)
    key_mask[1, 11:] = False
    params = attention.init(jax.random.PRNGKey(0), x, key_mask, True)["params"]
    params = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
    cotangent = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
    ours = lambda p, x: jnp.sum(attention.apply({"params": p}, x, key_mask, True) * cotangent)
    plain = lambda p, x: jnp.sum(
        _attention_with_every_bias(p, x, key_mask, small_config) * cotangent)
    np.testing.assert_allclose(ours(params, x), plain(params, x), rtol=1e-5)
    for got, want in zip(jax.tree.leaves(jax.grad(ours, (0, 1))(params, x)),
                         jax.tree.leaves(jax.grad(plain, (0, 1))(params, x))):
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-3)


def test_value_bias_is_added_before_attention_under_attention_dropout(small_config):
    """Dropout rescales rows of probabilities, so the value bias cannot pass through."""
    attention = CausalSelfAttention(dataclasses.replace(small_config, dropout=0.5))
    x = jnp.ones((1, 4, 32))
    params = attention.init(jax.random.PRNGKey(0), x, None, True)["params"]

    def value_bias(deterministic):
        _, state = attention.apply({"params": params}, x, None, deterministic,
                                   rngs={"dropout": jax.random.PRNGKey(1)},
                                   capture_intermediates=True)
        return state["intermediates"]["c_attn"]["__call__"][0][-1]

    assert value_bias(True) is not None
    assert value_bias(False) is None


def test_sequence_longer_than_block_size_is_refused(small_model):
    model, params = small_model
    with pytest.raises(ValueError, match="exceeds model.block_size"):
        model.apply({"params": params}, np.zeros((1, 17), np.int32))


def test_embedding_gradients_accumulate_in_float32(small_config):
    """With bfloat16 compute the embedding gradient is still a float32 scatter-add: a
    bfloat16 one rounds the sum over a frequent token's occurrences (and serialises on
    GPU). The ids repeat one token, as real text does."""
    config = dataclasses.replace(small_config, dtype="bfloat16")
    model = GPT(config)
    params = model.init_params(jax.random.PRNGKey(0))
    ids = jnp.zeros((2, config.block_size), jnp.int32).at[:, ::3].set(5)
    loss = lambda p: jnp.mean(model.apply({"params": p}, ids) ** 2)
    jaxpr = jax.make_jaxpr(jax.grad(loss))(params)
    scatters = [e for e in _all_eqns(jaxpr.jaxpr) if e.primitive.name.startswith("scatter")]
    assert scatters, "expected the embedding gradient to be a scatter-add"
    assert {str(e.invars[0].aval.dtype) for e in scatters} == {"float32"}


def _all_eqns(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():  # jit, custom_vjp, ... bodies
            inner = getattr(value, "jaxpr", value)
            if hasattr(inner, "eqns"):
                yield from _all_eqns(inner)


def test_cross_entropy_gradient_matches_autodiff_of_the_plain_formula():
    """token_nll has a hand-written VJP (softmax - onehot, in the logits' dtype); it must
    equal autodiff of log-sum-exp minus the target logit, give the padded vocabulary
    columns and masked positions no gradient, and return bfloat16 for bfloat16 logits."""
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(0, 3, (2, 6, 128)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 100, (2, 6)))
    mask = jnp.asarray([[1, 1, 0, 1, 0, 1], [0, 1, 1, 1, 1, 0]], jnp.float32)

    def plain(x):
        x = jnp.where(jnp.arange(128) < 100, x, -jnp.inf)
        nll = jax.nn.logsumexp(x, -1) - jnp.take_along_axis(x, targets[..., None], -1)[..., 0]
        return jnp.sum(nll * mask)

    ours = lambda x: cross_entropy_sum(x, targets, mask, 100)[0]
    np.testing.assert_allclose(ours(logits), plain(logits), rtol=1e-6)
    grad = jax.grad(ours)(logits)
    np.testing.assert_allclose(grad, jax.grad(plain)(logits), atol=1e-6)
    assert not np.any(grad[..., 100:]) and not np.any(grad[0, 2]) and not np.any(grad[1, 0])
    assert jax.grad(ours)(logits.astype(jnp.bfloat16)).dtype == jnp.bfloat16
