"""Checkpoints: exact resume, signals, non-finite steps, incompatible resumes."""

import json
import signal

import jax
import numpy as np
import pytest
from orbax.checkpoint._src.multihost import multihost

from jaxgpt2.errors import ConfigError, NonFiniteError
from jaxgpt2.resume import existing_steps
from jaxgpt2.trainer import Trainer
from runs import checkpoint_steps, losses, train_process, wait_for_step


def test_stop_and_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path, resume_config):
    straight = Trainer(resume_config("straight", "train.max_steps=12",
                                     "train.save_interval=6", "train.eval_interval=6"))
    straight.run()
    first = Trainer(resume_config("split", "train.max_steps=6",
                                  "train.save_interval=6", "train.eval_interval=6"))
    first.run()
    second = Trainer(resume_config("split", "train.max_steps=12", "train.resume=true",
                                   "train.save_interval=6", "train.eval_interval=6"))
    assert int(second.state.step) == 6
    second.run()
    assert losses(tmp_path / "split") == losses(tmp_path / "straight")
    for a, b in zip(jax.tree.leaves(jax.device_get(straight.state)),
                    jax.tree.leaves(jax.device_get(second.state))):
        np.testing.assert_array_equal(a, b)


def test_resume_with_another_model_shape_fails_before_any_step(resume_config):
    Trainer(resume_config("run", "train.max_steps=2", "train.save_interval=2")).run()
    with pytest.raises(ConfigError, match=r"model.n_layer: checkpoint 2, now 3"):
        Trainer(resume_config("run", "train.max_steps=4", "train.resume=true",
                              "model.n_layer=3"))


def test_injected_nan_steps_are_skipped_and_params_stay_finite(tmp_path, resume_config):
    trainer = Trainer(resume_config("run", "train.max_steps=10",
                                    "train.debug_nan_steps=[3,4,7]"))
    summary = trainer.run()
    # debug steps count from 0; the loop reports 1-based completed steps
    assert summary["skipped_steps"] == [4, 5, 8]
    # Their NaN grad_norm is logged as null: bare NaN is not JSON.
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line, parse_constant=lambda c: pytest.fail(f"bare {c} in JSON"))
               for line in lines]
    assert [r["step"] for r in records if "grad_norm" in r and r["grad_norm"] is None] == [4, 5, 8]
    opt = jax.device_get(trainer.state.opt_state)
    assert int(opt.total_notfinite) == 3
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(trainer.state.params)))


def test_consecutive_nonfinite_limit_stops_and_saves_the_unchanged_state(tmp_path, resume_config):
    config = resume_config("run", "train.max_steps=20", "train.save_interval=4",
                           "optim.max_consecutive_nonfinite=3", "train.keep=5",
                           "train.debug_nan_steps=[6,7,8,9,10,11]")
    trainer = Trainer(config)
    with pytest.raises(NonFiniteError, match="3 consecutive steps had non-finite gradients"
                                             r".*saved step 10 \(its weights are the last"):
        trainer.run()
    # Step 8 was saved mid-streak and step 10 (the step in flight when step 9's streak
    # was read) at the stop: skipped steps leave the last good weights, never NaN.
    assert checkpoint_steps(tmp_path / "run") == [4, 8, 10]
    resumed = Trainer(resume_config("run", "train.max_steps=20", "train.resume=true"))
    assert int(resumed.state.step) == 10
    restored = jax.device_get(resumed.state.params)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(restored))
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(jax.device_get(trainer.state.params))):
        np.testing.assert_array_equal(a, b)


def test_sigterm_saves_and_the_resumed_run_matches_an_uninterrupted_one(tmp_path):
    proc = train_process(tmp_path, "run", "train.max_steps=100000", "train.save_interval=100000",
                         "train.eval_interval=100000")
    wait_for_step(tmp_path / "run", 5)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "SIGTERM: saved step" in out and "train.resume=true" in out
    saved = checkpoint_steps(tmp_path / "run")
    stop = saved[-1]
    resume = train_process(tmp_path, "run", f"train.max_steps={stop + 5}", "train.resume=true",
                           "train.save_interval=100000", "train.eval_interval=100000")
    assert resume.wait(timeout=120) == 0
    straight = train_process(tmp_path, "straight", f"train.max_steps={stop + 5}",
                             "train.save_interval=100000", "train.eval_interval=100000")
    assert straight.wait(timeout=120) == 0
    a, b = losses(tmp_path / "run"), losses(tmp_path / "straight")
    assert {s: a[s] for s in range(stop + 1, stop + 6)} == {s: b[s] for s in range(stop + 1, stop + 6)}


def test_a_checkpoint_of_another_optimizer_is_refused_and_an_old_one_is_adamw():
    from jaxgpt2.resume import check_compatible
    current = {"model": {}, "data": {}, "optim": {"name": "adamw"}}
    with pytest.raises(ConfigError, match=r"optim.name: checkpoint 'lion', now 'adamw'"):
        check_compatible({"optim": {"name": "lion"}}, current)
    check_compatible({"optim": {}}, current)  # saved before optim.name existed: AdamW


@pytest.mark.parametrize("direction, kept", [("min", 2), ("max", 1)])
def test_retention_keeps_the_best_by_the_chosen_metric_and_direction(tmp_path, resume_config,
                                                                    direction, kept):
    from jaxgpt2.checkpoint import Checkpointer
    trainer = Trainer(resume_config("run", "train.max_steps=1"))
    checkpointer = Checkpointer(tmp_path / "ckpt", keep=1, best_metric="score",
                                best_direction=direction)
    for step, score in ((1, 0.5), (2, 0.1), (3, 0.3), (4, 0.4)):
        checkpointer.save(trainer.state.replace(step=jax.numpy.asarray(step)), {},
                          {"score": score, "val_loss": 9.0})
    checkpointer.wait()
    assert checkpointer.steps() == [kept, 4]  # the best, and the latest


def test_listing_checkpoints_waits_for_no_other_process(tmp_path, resume_config, monkeypatch):
    """Each process lists the folder before they agree on anything, and a process that
    saw the folder appear must not enter a barrier the others never reach (a two-process
    CI run once failed so)."""
    Trainer(resume_config("run", "train.max_steps=4", "train.save_interval=2",
                          "train.keep=5")).run()
    (tmp_path / "run" / "checkpoints" / "6.orbax-checkpoint-tmp-1").mkdir()  # unfinished

    def no_barrier(*args, **kwargs):
        raise AssertionError("existing_steps entered a cross-process barrier")

    monkeypatch.setattr(multihost, "sync_global_processes", no_barrier)
    assert existing_steps(tmp_path / "run") == [2, 4]
    assert existing_steps(tmp_path / "elsewhere") == []
