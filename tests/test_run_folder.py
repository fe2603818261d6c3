"""The run folder's guarantees: one run at a time, a full disk reported in one line with
the checkpoint to resume from, metrics.jsonl without replayed rows after a resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from jaxgpt2.data import resolve_dataset_dir
from jaxgpt2.errors import ConfigError
from jaxgpt2.run_lock import LOCK_NAME, RunLock
from jaxgpt2.trainer import Trainer
from runs import ROOT, checkpoint_steps, tiny_overrides


def test_a_second_run_on_a_locked_folder_fails_naming_the_holder_and_changes_nothing(
        tmp_path, run_config):
    first = Trainer(run_config("run", "train.max_steps=2", "train.sample_tokens=0"))
    with pytest.raises(ConfigError, match=rf"in use by another run \(host .*, pid {os.getpid()}, "
                                          r"started .*\); wait for it"):
        Trainer(run_config("run", "train.max_steps=2", "optim.lr=3e-3"))
    assert not (tmp_path / "run" / "config.yaml").exists()  # the refused run wrote nothing
    first.run()
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["optim"]["lr"] == pytest.approx(1e-3)  # the first run's, not the second's
    # Released at the end of the run: the folder can be resumed.
    Trainer(run_config("run", "train.max_steps=4", "train.resume=true")).run()
    assert checkpoint_steps(tmp_path / "run")[-1] == 4


def test_the_lock_of_a_killed_process_is_released_by_the_kernel(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path;"
         "from jaxgpt2.run_lock import RunLock; lock = RunLock.acquire(Path(sys.argv[1]));"
         "lock.record_holder();"
         "print('held', flush=True); time.sleep(60)", str(tmp_path / "run")],
        cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(ConfigError, match=f"pid {holder.pid}"):
        RunLock.acquire(tmp_path / "run")
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    RunLock.acquire(tmp_path / "run").release()  # no stale lock
    assert (tmp_path / "run" / LOCK_NAME).exists()


def test_a_resumed_run_drops_the_metrics_rows_it_replays(tmp_path, resume_config):
    Trainer(resume_config("run", "train.max_steps=6", "train.save_interval=3")).run()
    Trainer(resume_config("run", "train.max_steps=6", "train.save_interval=3",
                          "train.resume_step=3")).run()
    rows = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in rows if "train_loss" in r]
    assert train_steps == [1, 2, 3, 4, 5, 6]  # steps 4-6 once, from the resumed run
    assert [r["step"] for r in rows if "val_loss" in r] == [6]


def test_a_failed_checkpoint_write_stops_the_run_at_once_with_one_line(tmp_path):
    resolve_dataset_dir("shakespeare_char", str(tmp_path / "data"))  # outside the limit
    env = {**os.environ, "JAX_ENABLE_COMPILATION_CACHE": "false"}
    start = time.time()
    # Under `ulimit -f 64` a write past 64 KiB fails as on a full disk (EFBIG, not
    # ENOSPC: Python ignores SIGXFSZ); the checkpoint's files are larger, its metrics not.
    result = subprocess.run(
        ["bash", "-c", 'ulimit -f 64 && exec "$@"', "bash", sys.executable, "train.py",
         "--config", "configs/tiny.yaml",
         *tiny_overrides(tmp_path, "run", "train.max_steps=2000", "train.save_interval=100",
                         "train.eval_interval=1000", "train.log_interval=1",
                         "train.sample_tokens=0")],
        cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 1
    lines = (result.stdout + result.stderr).strip().splitlines()
    # The start-up lines, then the error: no orbax pages, no tracebacks.
    assert len(lines) <= 12 and not any("Traceback" in l or "ERROR" in l for l in lines), lines
    assert lines[-1].startswith(f"error: saving checkpoint {tmp_path / 'run/checkpoints/100'} "
                                "failed (File too large); a checkpoint needs about")
    assert "no checkpoint of this run is complete" in lines[-1]
    logged = [json.loads(l)["step"] for l in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert 100 <= max(logged) < 200, "the run went on to the next save before stopping"
    assert time.time() - start < 300
