"""Compiling ahead: the run's programs compile on another thread from shapes alone, and
the calls that follow find them compiled."""

import logging
import re
import threading

import jax
import pytest

from jaxgpt2 import trainer as trainer_module
from jaxgpt2.ahead import CompileAhead
from jaxgpt2.trainer import Trainer
from runs import tiny_config


@pytest.mark.parametrize("background", [True, False])  # False: the path GPUs take
def test_the_steps_evaluations_and_samples_are_not_compiled_again(tmp_path, caplog, monkeypatch,
                                                                 background):
    monkeypatch.setattr(trainer_module, "CompileAhead", lambda **_: CompileAhead(background))
    trainer = Trainer(tiny_config(tmp_path, "run", "train.max_steps=4", "train.eval_interval=2",
                                  "train.eval_steps=2", "train.sample_tokens=8",
                                  "train.eval_sample_tokens=4"))
    for job in ("train_step", "evaluations", "samples"):
        trainer.ahead.result(job)
    with jax.log_compiles(True), caplog.at_level(logging.WARNING):
        summary = trainer.run()
        text = trainer.sample()
    compiled = set(re.findall(r"Finished XLA compilation of jit\((\w+)\)", caplog.text))
    assert "val_loss" in summary and text
    assert not compiled & {"train_step", "eval_step", "_generate"}, compiled


def test_jobs_run_in_order_off_the_calling_thread():
    ahead, seen = CompileAhead(), []
    for name in ("first", "second"):
        ahead.start(name, lambda name=name: seen.append((name, threading.current_thread())) or name)
    assert ahead.result("second")[0] == "second"
    assert [n for n, _ in seen] == ["first", "second"]
    assert all(t is not threading.current_thread() for _, t in seen)


def test_without_background_a_job_runs_on_the_callers_thread_when_first_waited_for():
    ahead, seen = CompileAhead(background=False), []
    ahead.start("job", lambda: seen.append(threading.current_thread()) or "value")
    ahead.start("unused", lambda: seen.append("unused"))
    assert seen == [] and not ahead.done("job")
    assert ahead.result("job")[0] == "value"
    ahead.wait("job")  # once only
    assert seen == [threading.current_thread()] and ahead.done("job")


@pytest.mark.parametrize("background", [True, False])
def test_a_failed_job_raises_for_its_result_but_not_for_a_wait(background):
    ahead = CompileAhead(background)
    ahead.start("broken", lambda: 1 / 0)
    ahead.wait("broken")  # the call it warmed up compiles (and fails) on its own
    ahead.wait("never started")
    with pytest.raises(ZeroDivisionError):
        ahead.result("broken")


def test_cancel_drops_the_jobs_not_yet_begun():
    ahead, release, ran = CompileAhead(), threading.Event(), []
    ahead.start("running", release.wait)
    ahead.start("queued", lambda: ran.append("queued"))
    ahead.cancel()
    release.set()
    ahead.wait("running")
    ahead.wait("queued")  # dropped: nothing to wait for
    assert ran == []
