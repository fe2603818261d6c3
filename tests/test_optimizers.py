"""The optimizer and schedule choices: schedule values, every rule training under the
same guarded chain, Muon's per-matrix orthogonalisation, exact resume, refused fields."""

import subprocess
import sys
import typing

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxgpt2.config import OptimConfig, OptimizerName, ScheduleName
from jaxgpt2.errors import ConfigError
from jaxgpt2.optim import (OPTIMIZERS, build_optimizer, learning_rate_schedule,
                           weight_decay_mask)
from jaxgpt2.step import create_train_state, make_train_step
from jaxgpt2.trainer import Trainer
from runs import ROOT, losses

NAMES = list(typing.get_args(OptimizerName))
# A learning rate each rule trains the small model with (Lion's is 3x below AdamW's;
# Adafactor's is relative to each weight's RMS).
LR = {"adamw": 3e-3, "lion": 1e-3, "adafactor": 3e-2, "sgd": 0.3, "muon": 3e-3}
NAN_STEP = 30


def _values(schedule, steps):
    return [float(schedule(s)) for s in steps]


def test_linear_schedule_warms_up_then_decays_linearly_to_min_lr():
    cfg = OptimConfig(schedule="linear", lr=1.0, min_lr=0.1, warmup_steps=10, decay_steps=110)
    schedule = learning_rate_schedule(cfg, max_steps=500)
    np.testing.assert_allclose(_values(schedule, [0, 5, 10, 60, 110, 300]),
                               [0.0, 0.5, 1.0, 0.55, 0.1, 0.1], rtol=1e-6)


@pytest.mark.parametrize("shape, midway", [("linear", 0.55), ("1-sqrt", 1 - 0.9 * 0.5 ** 0.5)])
def test_wsd_schedule_holds_lr_then_decays_over_the_last_fraction(shape, midway):
    cfg = OptimConfig(schedule="wsd", lr=1.0, min_lr=0.1, warmup_steps=10, decay_steps=200,
                      decay_fraction=0.2, decay_shape=shape)
    schedule = learning_rate_schedule(cfg, max_steps=500)
    # warmup end, the stable phase, the decay's start, its middle, its end, after it
    np.testing.assert_allclose(_values(schedule, [5, 10, 100, 160, 180, 200, 400]),
                               [0.5, 1.0, 1.0, 1.0, midway, 0.1, 0.1], rtol=1e-6)


def test_wsd_decay_never_starts_inside_the_warmup():
    cfg = OptimConfig(schedule="wsd", lr=1.0, min_lr=0.0, warmup_steps=50, decay_steps=100,
                      decay_fraction=0.9, decay_shape="linear")
    schedule = learning_rate_schedule(cfg, max_steps=100)
    np.testing.assert_allclose(_values(schedule, [50, 75, 100]), [1.0, 0.5, 0.0], atol=1e-7)


def test_inverse_sqrt_schedule_halves_the_rate_at_four_times_the_warmup():
    cfg = OptimConfig(schedule="inverse_sqrt", lr=1.0, warmup_steps=100)
    schedule = learning_rate_schedule(cfg, max_steps=10)
    np.testing.assert_allclose(_values(schedule, [50, 100, 400, 10000]),
                               [0.5, 1.0, 0.5, 0.1], rtol=1e-6)


def test_constant_schedule_holds_lr_after_warmup():
    cfg = OptimConfig(schedule="constant", lr=1.0, min_lr=1.0, warmup_steps=4)
    np.testing.assert_allclose(_values(learning_rate_schedule(cfg, 10), [2, 4, 1000]),
                               [0.5, 1.0, 1.0])


def _batch(rows=8, T=16, vocab=100):
    ids = np.random.default_rng(0).integers(0, vocab, (1, rows, T + 1)).astype(np.int32)
    return {"input_ids": ids[..., :-1], "targets": ids[..., 1:],
            "loss_mask": np.ones((1, rows, T), np.float32)}


@pytest.fixture(scope="module", params=NAMES)
def trajectory(request, small_model):
    """60 jitted steps of one optimizer on a fixed batch, step ``NAN_STEP`` poisoned."""
    name = request.param
    model, params = small_model
    lr = LR[name]
    cfg = OptimConfig(name=name, lr=lr, min_lr=lr / 10, warmup_steps=5)
    cfg.validate()
    tx = build_optimizer(cfg, 100)
    step = jax.jit(make_train_step(model, tx, debug_nan_steps=(NAN_STEP,)))
    state, batch, found = create_train_state(params, tx, 0), _batch(), {"losses": []}
    for i in range(60):
        if i == NAN_STEP:
            found["before"] = jax.device_get(state)
        state, metrics = step(state, batch)
        found["losses"].append(float(metrics["loss"]))
        if i == NAN_STEP:
            found["after"], found["applied"] = jax.device_get(state), bool(metrics["applied"])
    return found


def test_every_optimizer_lowers_the_loss_within_60_steps(trajectory):
    first, last = trajectory["losses"][0], trajectory["losses"][-1]
    assert last < 0.9 * first, (first, last)


def test_a_nonfinite_step_changes_nothing_under_every_optimizer(trajectory):
    before, after = trajectory["before"], trajectory["after"]
    assert not trajectory["applied"]
    for a, b in zip(jax.tree.leaves((before.params, before.opt_state.inner_state)),
                    jax.tree.leaves((after.params, after.opt_state.inner_state))):
        np.testing.assert_array_equal(a, b)
    assert int(after.opt_state.notfinite_count) == 1


@pytest.mark.parametrize("name", NAMES)
def test_weight_decay_reaches_only_masked_leaves_under_every_optimizer(name):
    params = {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,))},
              "ln": {"scale": jnp.ones((2,))}, "wte": {"embedding": jnp.ones((3, 2))}}
    cfg = OptimConfig(name=name, lr=0.1, min_lr=0.1, warmup_steps=0, weight_decay=0.5,
                      schedule="constant", muon_weight_decay=0.5 if name == "muon" else 0.0)
    tx = build_optimizer(cfg, max_steps=10)
    state, zeros = tx.init(params), jax.tree.map(jnp.zeros_like, params)
    for _ in range(2):
        updates, state = tx.update(zeros, state, params)
        params = optax.apply_updates(params, updates)
    assert float(params["dense"]["kernel"][0, 0]) < 1.0
    assert float(params["wte"]["embedding"][0, 0]) < 1.0
    assert float(params["dense"]["bias"][0]) == 1.0
    assert float(params["ln"]["scale"][0]) == 1.0


@jax.jit
def _muon_update(grads):
    """The Muon rule's first update of ``grads`` (at lr 1, so it is the direction)."""
    cfg = OptimConfig(name="muon", lr=1.0, muon_lr=1.0, schedule="constant", min_lr=1.0,
                      warmup_steps=0)
    rule = OPTIMIZERS["muon"](cfg, optax.constant_schedule(1.0))
    params = jax.tree.map(jnp.zeros_like, grads)
    return rule.update(grads, rule.init(params), params)[0]


@pytest.fixture(scope="module")
def muon_step(small_model):
    """Random gradients for the small model and Muon's first update of them."""
    _, params = small_model
    keys = iter(jax.random.split(jax.random.PRNGKey(1), len(jax.tree.leaves(params))))
    grads = jax.tree.map(lambda x: jax.random.normal(next(keys), x.shape), params)
    return grads, _muon_update(grads)


def test_muon_orthogonalises_each_layer_of_a_stacked_kernel_alone(muon_step):
    grads, update = muon_step
    kernel, stacked = grads["h"]["mlp"]["c_fc"]["kernel"], update["h"]["mlp"]["c_fc"]["kernel"]
    for layer in range(kernel.shape[0]):
        alone = _muon_update({"w": {"kernel": kernel[layer]}})["w"]["kernel"]
        np.testing.assert_allclose(stacked[layer], alone, rtol=1e-4, atol=1e-5)


def test_muon_orthogonalises_queries_keys_and_values_apart(muon_step):
    grads, update = muon_step
    kernel = grads["h"]["attn"]["c_attn"]["kernel"]
    update = update["h"]["attn"]["c_attn"]["kernel"]
    C = kernel.shape[1]
    for layer in range(kernel.shape[0]):
        for part in range(3):
            columns = slice(part * C, (part + 1) * C)
            alone = _muon_update({"q": {"kernel": kernel[layer][:, columns]}})["q"]["kernel"]
            np.testing.assert_allclose(update[layer][:, columns], alone, rtol=1e-4, atol=1e-5)
            # Newton-Schulz leaves singular values around 1 (about 0.5-1.2, mean ~0.87):
            # each block is near-orthogonal, not a third of one orthogonalised (C, 3C)
            # matrix, whose blocks' singular values average about 0.41.
            singular = np.linalg.svd(np.asarray(update[layer][:, columns]), compute_uv=False)
            assert 0.75 < singular.mean() < 1.1, singular


def test_muon_gives_embeddings_biases_and_norms_to_adamw(muon_step):
    _, update = muon_step
    # AdamW's first step (zero weight decay on zero weights) is -lr * sign(g).
    for leaf in (update["wte"]["embedding"], update["wpe"]["embedding"],
                 update["h"]["ln_1"]["scale"], update["h"]["attn"]["c_attn"]["bias"]):
        np.testing.assert_allclose(np.abs(leaf), 1.0, rtol=1e-4)


def test_default_adamw_state_is_the_one_old_checkpoints_hold(small_model):
    _, params = small_model
    cfg = OptimConfig()
    old = optax.apply_if_finite(optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip),
        optax.adamw(learning_rate_schedule(cfg, 100), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                    weight_decay=cfg.weight_decay, mask=weight_decay_mask)), 5)
    new_state = build_optimizer(cfg, 100).init(params)
    assert jax.tree.structure(new_state) == jax.tree.structure(old.init(params))


# adamw's exact resume is test_resume.py's first test; each case here costs a compile.
@pytest.mark.parametrize("name", [n for n in NAMES if n != "adamw"])
def test_resume_is_bit_identical_under_every_optimizer(tmp_path, resume_config, name):
    # The schedule's length is pinned, so all three runs compile the same step (cached).
    common = ("train.save_interval=2", "train.eval_interval=2", "optim.decay_steps=100",
              f"optim.name={name}")
    straight = Trainer(resume_config("straight", "train.max_steps=4", *common))
    straight.run()
    Trainer(resume_config("split", "train.max_steps=2", *common)).run()
    second = Trainer(resume_config("split", "train.max_steps=4", "train.resume=true", *common))
    second.run()
    assert losses(tmp_path / "split") == losses(tmp_path / "straight")
    for a, b in zip(jax.tree.leaves(jax.device_get(straight.state)),
                    jax.tree.leaves(jax.device_get(second.state))):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("settings, message", [
    ({"name": "adamw", "sgd_momentum": 0.5},
     "optim.sgd_momentum=0.5 applies to optim.name sgd, not adamw"),
    ({"name": "sgd", "b2": 0.99}, "optim.b2=0.99 applies to optim.name adamw and muon, not sgd"),
    ({"name": "lion", "muon_lr": 0.05}, "optim.muon_lr=0.05 applies to optim.name muon, not lion"),
    ({"schedule": "cosine", "decay_fraction": 0.3},
     "optim.decay_fraction=0.3 applies to optim.schedule wsd, not cosine"),
    ({"schedule": "inverse_sqrt", "decay_steps": 100},
     "optim.decay_steps=100 applies to optim.schedule cosine, linear and wsd, not inverse_sqrt"),
])
def test_a_field_of_another_optimizer_or_schedule_is_refused_by_name(settings, message):
    with pytest.raises(ConfigError, match=message):
        OptimConfig(**settings).validate()


@pytest.mark.parametrize("settings, message", [
    ({"schedule": "inverse_sqrt", "warmup_steps": 0}, "needs optim.warmup_steps >= 1"),
    ({"name": "lion", "lion_b2": 1.0}, r"optim.lion_b2 must be in \[0, 1\)"),
    ({"name": "muon", "muon_ns_steps": 0}, "optim.muon_ns_steps must be positive"),
    ({"schedule": "wsd", "decay_fraction": 1.5}, "optim.decay_fraction <= 1"),
])
def test_out_of_range_rule_fields_are_refused(settings, message):
    with pytest.raises(ConfigError, match=message):
        OptimConfig(**settings).validate()


def test_fields_at_their_defaults_or_min_lr_equal_to_lr_are_accepted_everywhere():
    for name in NAMES:
        OptimConfig(name=name).validate()
    for schedule in typing.get_args(ScheduleName):
        OptimConfig(schedule=schedule, lr=3e-5, min_lr=3e-5).validate()


def test_the_applies_to_tables_name_real_fields_and_choices():
    fields = OptimConfig.__dataclass_fields__
    for table, choices in ((OptimConfig.FOR_OPTIMIZERS, NAMES),
                           (OptimConfig.FOR_SCHEDULES, typing.get_args(ScheduleName))):
        for key, applies in table.items():
            assert key in fields and set(applies) <= set(choices), (key, applies)


def test_an_unknown_optimizer_name_exits_1_listing_the_valid_ones():
    result = subprocess.run([sys.executable, "train.py", "--config", "configs/tiny.yaml",
                             "optim.name=adamx"], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 1
    assert "optim.name='adamx' is not one of adamw, lion, adafactor, sgd, muon" in result.stderr
