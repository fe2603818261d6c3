"""float16 training with dynamic loss scaling, on the CPU."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt2.config import OptimConfig
from jaxgpt2.loss_scale import LossScale
from jaxgpt2.model import GPT
from jaxgpt2.optim import Optimizer, applied_updates, build_optimizer, learning_rate_schedule
from jaxgpt2.step import create_train_state, make_train_step
from jaxgpt2.errors import NonFiniteError
from jaxgpt2.trainer import Trainer
from runs import losses


def _batch(seed=0, rows=4, T=16, vocab=100):
    ids = np.random.default_rng(seed).integers(0, vocab, (1, rows, T + 1)).astype(np.int32)
    return {"input_ids": ids[..., :-1], "targets": ids[..., 1:],
            "loss_mask": np.ones((1, rows, T), np.float32)}


def _leaves_equal(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_scale_halves_on_overflow_and_doubles_after_interval_finite_steps():
    s = LossScale.create(8.0)
    yes, no = jnp.asarray(True), jnp.asarray(False)
    s = s.update(grads_finite=no, interval=3)
    assert (float(s.scale), int(s.good_steps)) == (4.0, 0)
    s = s.update(yes, 3)
    s = s.update(yes, 3)
    assert (float(s.scale), int(s.good_steps)) == (4.0, 2)
    s = s.update(yes, 3)
    assert (float(s.scale), int(s.good_steps)) == (8.0, 0)
    s = s.update(yes, 3)
    s = s.update(no, 3)  # an overflow also resets the run of good steps
    assert (float(s.scale), int(s.good_steps)) == (4.0, 0)
    assert float(LossScale.create(1.0).update(no, 3).scale) == 1.0


@pytest.fixture(scope="module")
def fp16_model(small_config):
    model = GPT(dataclasses.replace(small_config, dtype="float16"))
    return model, model.init_params(jax.random.PRNGKey(0))


def test_overflowing_steps_are_skipped_whole_until_the_scale_fits(fp16_model):
    """2**24 overflows float16 in the backward pass; each overflow keeps parameters and
    optimizer state, halves the scale, and is not counted as a non-finite step."""
    model, params = fp16_model
    cfg = OptimConfig(warmup_steps=0, lr=1e-3)
    tx = build_optimizer(cfg, 100)
    step = jax.jit(make_train_step(model, tx))
    state = create_train_state(params, tx, 0, loss_scale=2.0 ** 24)
    batch = _batch()
    overflows, scales, first_loss = 0, [], None
    for _ in range(30):
        before = jax.device_get(state)
        state, m = step(state, batch)
        first_loss = first_loss if first_loss is not None else float(m["loss"])
        assert int(m["nonfinite_streak"]) == 0
        if bool(m["overflow"]):
            overflows += 1
            assert not bool(m["applied"])
            assert float(m["lr"]) == pytest.approx(float(learning_rate_schedule(cfg, 100)(0)))
            after = jax.device_get(state)
            assert _leaves_equal(before.params, after.params)
            assert _leaves_equal(before.opt_state, after.opt_state)
        else:
            assert bool(m["applied"])
        scales.append(float(m["loss_scale"]))
    assert overflows >= 3, "2**24 should overflow float16 for several halvings"
    assert scales[overflows - 1] == 2.0 ** 24 / 2 ** overflows
    assert int(applied_updates(state.opt_state, state.step)) == 30 - overflows
    assert int(state.opt_state.total_notfinite) == 0
    assert float(m["loss"]) < first_loss - 0.5
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(state.params)))


def test_unscaled_gradient_equals_the_float32_gradient_direction(fp16_model, small_config):
    """A fitting scale changes nothing but rounding: the first applied step's update
    matches the float32 model's to float16 precision (plain SGD shows the gradient)."""
    import optax
    model16, params = fp16_model
    model32 = GPT(small_config)
    tx = Optimizer.guard(optax.sgd(1.0), optax.constant_schedule(1.0))
    batch = _batch(1)
    s16, _ = jax.jit(make_train_step(model16, tx))(
        create_train_state(params, tx, 0, loss_scale=1024.0), batch)
    s32, _ = jax.jit(make_train_step(model32, tx))(create_train_state(params, tx, 0), batch)
    d16 = jax.tree.map(lambda a, b: a - b, s16.params, params)
    d32 = jax.tree.map(lambda a, b: a - b, s32.params, params)
    num = sum(float(jnp.sum((a - b) ** 2)) for a, b in zip(jax.tree.leaves(d16), jax.tree.leaves(d32)))
    den = sum(float(jnp.sum(b ** 2)) for b in jax.tree.leaves(d32))
    assert (num / den) ** 0.5 < 2e-2


def _sgd_delta(model, params, batch, scale):
    import optax
    tx = Optimizer.guard(optax.sgd(1.0), optax.constant_schedule(1.0))
    step = jax.jit(make_train_step(model, tx))
    state, _ = step(create_train_state(params, tx, 0, loss_scale=scale), batch)
    return jnp.concatenate([(a - b).ravel() for a, b in
                            zip(jax.tree.leaves(state.params), jax.tree.leaves(params))])


def test_scaled_accumulation_over_masked_micro_batches_equals_one_batch(fp16_model):
    model, params = fp16_model
    one = _batch(2, rows=4)
    one["loss_mask"][0, 1, 5:] = 0.0  # uneven real-token counts across micro-batches
    one["loss_mask"][0, 3, 2:] = 0.0
    split = {k: v.reshape(2, 2, -1) for k, v in one.items()}
    whole, parts = _sgd_delta(model, params, one, 1024.0), _sgd_delta(model, params, split, 1024.0)
    assert float(jnp.linalg.norm(whole - parts) / jnp.linalg.norm(whole)) < 1e-2


def test_a_non_finite_loss_is_a_real_failure_even_with_scale_above_one(fp16_model):
    """Only a finite loss with non-finite gradients is an overflow; a non-finite loss is
    counted by apply_if_finite (the scale still halves, as in PyTorch)."""
    model, params = fp16_model
    broken = jax.tree.map(lambda x: x, params)
    broken["wpe"] = {"embedding": params["wpe"]["embedding"].at[0, 0].set(jnp.inf)}
    cfg = OptimConfig(warmup_steps=0)
    tx = build_optimizer(cfg, 10)
    step = jax.jit(make_train_step(model, tx))
    state, m = step(create_train_state(broken, tx, 0, loss_scale=1024.0), _batch())
    assert not np.isfinite(float(m["loss"]))
    assert not bool(m["overflow"]) and not bool(m["applied"])
    assert int(m["nonfinite_streak"]) == 1 and int(state.opt_state.total_notfinite) == 1
    assert float(m["loss_scale"]) == 512.0


def test_float16_run_trains_logs_its_scale_and_resumes_exactly(tmp_path, resume_config):
    fp16 = ("model.dtype=float16", "model.dropout=0.0", "optim.loss_scale_interval=4",
            "train.save_interval=6", "train.eval_interval=6")
    straight = Trainer(resume_config("straight", "train.max_steps=12", *fp16))
    summary = straight.run()
    assert summary["train_loss"] < summary["first_loss"]
    Trainer(resume_config("split", "train.max_steps=6", *fp16)).run()
    second = Trainer(resume_config("split", "train.max_steps=12", "train.resume=true",
                                   *fp16))
    assert float(second.state.loss_scale.scale) == 65536.0 * 2  # grew once in 6 steps
    second.run()
    assert losses(tmp_path / "split") == losses(tmp_path / "straight")
    assert _leaves_equal(jax.device_get(straight.state), jax.device_get(second.state))
    records = [json.loads(l) for l in (tmp_path / "straight/metrics.jsonl").read_text().splitlines()]
    scales = [r["loss_scale"] for r in records if "loss_scale" in r]
    assert len(scales) == 12 and scales[-1] > scales[0]  # grew every 4 good steps


def test_a_checkpoint_moves_between_float16_and_float32(tmp_path, resume_config):
    """Also the logged lr after the move: it follows applied updates, and the float16
    run's overflow skips applied none."""
    Trainer(resume_config("run", "train.max_steps=3", "train.save_interval=3",
                          "model.dtype=float16", "optim.loss_scale=16777216")).run()
    as32 = Trainer(resume_config("run", "train.max_steps=4", "train.resume=true",
                                 "model.dtype=float32"))
    assert as32.state.loss_scale is None
    applied = int(applied_updates(as32.state.opt_state, as32.state.step))
    assert applied < 3, "2**24 should have overflowed at least once"
    as32.run()
    logged = [json.loads(l) for l in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    lr_at_4 = [r["lr"] for r in logged if r["step"] == 4 and "lr" in r][-1]
    assert lr_at_4 == pytest.approx(float(as32.optimizer.schedule(applied)))
    as16 = Trainer(resume_config("run", "train.max_steps=6", "train.resume=true",
                                 "model.dtype=float16", "optim.loss_scale=512"))
    assert float(as16.state.loss_scale.scale) == 512.0
    assert as16.run()["step"] == 6


def test_non_finite_gradients_at_scale_one_still_stop_the_run(resume_config):
    trainer = Trainer(resume_config("run", "train.max_steps=10", "model.dtype=float16",
                                    "optim.loss_scale=1", "optim.max_consecutive_nonfinite=2",
                                    "train.debug_nan_steps=[2,3]"))
    with pytest.raises(NonFiniteError, match="2 consecutive steps"):
        trainer.run()
