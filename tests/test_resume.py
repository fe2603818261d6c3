"""Checkpoints: exact resume, signals, non-finite steps, incompatible resumes."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxgpt2.config import ConfigError, load_config
from jaxgpt2.trainer import NonFiniteError, Trainer

ROOT = Path(__file__).resolve().parents[1]


def make_config(tmp_path, run="run", *extra):
    return load_config(ROOT / "configs/tiny.yaml", [
        f"train.out_dir={tmp_path / run}", f"data.cache_dir={tmp_path / 'data'}",
        "train.progress=false", "train.log_interval=1", "train.eval_steps=1",
        "train.sample_tokens=0", "model.dropout=0.1", *extra])


def losses(run_dir: Path) -> dict[int, float]:
    lines = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train_loss"] for r in lines if "train_loss" in r}


def test_stop_and_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path):
    straight = Trainer(make_config(tmp_path, "straight", "train.max_steps=12",
                                   "train.save_interval=6", "train.eval_interval=6"))
    straight.run()
    first = Trainer(make_config(tmp_path, "split", "train.max_steps=6",
                                "train.save_interval=6", "train.eval_interval=6"))
    first.run()
    second = Trainer(make_config(tmp_path, "split", "train.max_steps=12", "train.resume=true",
                                 "train.save_interval=6", "train.eval_interval=6"))
    assert int(second.state.step) == 6
    second.run()
    assert losses(tmp_path / "split") == losses(tmp_path / "straight")
    for a, b in zip(jax.tree.leaves(jax.device_get(straight.state)),
                    jax.tree.leaves(jax.device_get(second.state))):
        np.testing.assert_array_equal(a, b)


def test_resume_with_another_model_shape_fails_before_any_step(tmp_path):
    Trainer(make_config(tmp_path, "run", "train.max_steps=2", "train.save_interval=2")).run()
    with pytest.raises(ConfigError, match=r"model.n_layer: checkpoint 2, now 3"):
        Trainer(make_config(tmp_path, "run", "train.max_steps=4", "train.resume=true",
                            "model.n_layer=3"))


def test_injected_nan_steps_are_skipped_and_params_stay_finite(tmp_path):
    trainer = Trainer(make_config(tmp_path, "run", "train.max_steps=10",
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


def test_consecutive_nonfinite_limit_stops_and_saves_the_unchanged_state(tmp_path):
    config = make_config(tmp_path, "run", "train.max_steps=20", "train.save_interval=4",
                         "optim.max_consecutive_nonfinite=3", "train.keep=5",
                         "train.debug_nan_steps=[6,7,8,9,10,11]")
    trainer = Trainer(config)
    with pytest.raises(NonFiniteError, match="3 consecutive steps had non-finite gradients"
                                             r".*saved step 10 \(its weights are the last"):
        trainer.run()
    ckpts = tmp_path / "run" / "checkpoints"
    # Step 8 was saved mid-streak and step 10 (the step in flight when step 9's streak
    # was read) at the stop: skipped steps leave the last good weights, never NaN.
    assert sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit()) == [4, 8, 10]
    resumed = Trainer(make_config(tmp_path, "run", "train.max_steps=20", "train.resume=true"))
    assert int(resumed.state.step) == 10
    restored = jax.device_get(resumed.state.params)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(restored))
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(jax.device_get(trainer.state.params))):
        np.testing.assert_array_equal(a, b)


def _train_process(tmp_path, run, *extra):
    """A CLI run; the schedule length is pinned so runs of different max_steps agree."""
    cmd = [sys.executable, "train.py", "--config", "configs/tiny.yaml",
           f"train.out_dir={tmp_path / run}", f"data.cache_dir={tmp_path / 'data'}",
           "train.progress=false", "train.log_interval=1", "train.eval_steps=1",
           "train.sample_tokens=0", "optim.decay_steps=1000", *extra]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _wait_for_step(run_dir: Path, step: int, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (run_dir / "metrics.jsonl").exists() and any(s >= step for s in losses(run_dir)):
            return
        time.sleep(0.05)
    raise TimeoutError(f"run never reached step {step}")


def test_sigterm_saves_and_the_resumed_run_matches_an_uninterrupted_one(tmp_path):
    proc = _train_process(tmp_path, "run", "train.max_steps=100000", "train.save_interval=100000",
                          "train.eval_interval=100000")
    _wait_for_step(tmp_path / "run", 5)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "SIGTERM: saved step" in out and "train.resume=true" in out
    saved = sorted(int(p.name) for p in (tmp_path / "run/checkpoints").iterdir() if p.name.isdigit())
    stop = saved[-1]
    resume = _train_process(tmp_path, "run", f"train.max_steps={stop + 5}", "train.resume=true",
                            "train.save_interval=100000", "train.eval_interval=100000")
    assert resume.wait(timeout=120) == 0
    straight = _train_process(tmp_path, "straight", f"train.max_steps={stop + 5}",
                              "train.save_interval=100000", "train.eval_interval=100000")
    assert straight.wait(timeout=120) == 0
    a, b = losses(tmp_path / "run"), losses(tmp_path / "straight")
    assert {s: a[s] for s in range(stop + 1, stop + 6)} == {s: b[s] for s in range(stop + 1, stop + 6)}
