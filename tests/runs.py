"""Helpers for tests that train tiny runs (a plain module, not a test file).

Test files import it as ``from runs import ...`` (pytest puts tests/ on sys.path), and so
does ``tests/sharding_worker.py`` (run as a script from tests/). The worker imports it
before it fixes its device count, so nothing here imports JAX (or jaxgpt2, which does)
at module level.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs/tiny.yaml"

# What the checkpoint and resume tests add to every run: a train loss each step, one eval
# batch, no sample, and dropout on so that a resume must also restore the dropout stream.
RESUME_OVERRIDES = ("train.log_interval=1", "train.eval_steps=1", "train.sample_tokens=0",
                    "model.dropout=0.1")


def tiny_overrides(base: Path, run: str = "run", *extra: str) -> list[str]:
    """The overrides of a configs/tiny.yaml run in ``base/run`` with its data cached in
    ``base/data`` and no progress bar; ``extra`` follow (and so win)."""
    return [f"train.out_dir={base / run}", f"data.cache_dir={base / 'data'}",
            "train.progress=false", *extra]


def tiny_config(base: Path, run: str = "run", *extra: str):
    """configs/tiny.yaml loaded with ``tiny_overrides(base, run, *extra)``."""
    from jaxgpt2.config import load_config

    return load_config(TINY, tiny_overrides(base, run, *extra))


def losses(run_dir: Path) -> dict[int, float]:
    """The logged train loss of each step of a run folder."""
    lines = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train_loss"] for r in lines if "train_loss" in r}


def checkpoint_steps(run_dir: Path) -> list[int]:
    """The steps a run folder holds checkpoints of, in order."""
    return sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())


def train_process(tmp_path: Path, run: str, *extra: str) -> subprocess.Popen:
    """A CLI run; the schedule length is pinned so runs of different max_steps agree."""
    cmd = [sys.executable, "train.py", "--config", "configs/tiny.yaml",
           *tiny_overrides(tmp_path, run, "train.log_interval=1", "train.eval_steps=1",
                           "train.sample_tokens=0", "optim.decay_steps=1000", *extra)]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def wait_for_step(run_dir: Path, step: int, timeout: float = 120) -> None:
    """Wait until a run (in another process) has logged the train loss of ``step``."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (run_dir / "metrics.jsonl").exists() and any(s >= step for s in losses(run_dir)):
            return
        time.sleep(0.05)
    raise TimeoutError(f"run never reached step {step}")
