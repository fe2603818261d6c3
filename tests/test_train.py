"""End to end: the CLI trains on the bundled corpus, logs, checkpoints and samples."""

import json
import subprocess
import sys

from jaxgpt2.trainer import Trainer
from runs import ROOT, checkpoint_steps, tiny_overrides


def test_200_steps_lower_the_loss_well_below_its_start(run_config):
    config = run_config(
        "run", "train.max_steps=200", "train.eval_interval=200", "train.eval_steps=4",
        "model.n_embd=64", "data.batch_size=16", "optim.lr=3e-3", "optim.warmup_steps=20",
        "train.save_interval=200")
    summary = Trainer(config).run()
    assert summary["first_loss"] > 4.0  # about ln(65) at initialisation
    assert summary["train_loss"] < summary["first_loss"] - 1.3
    assert summary["val_loss"] < 2.9


def test_cli_writes_metrics_config_checkpoints_and_a_sample(tmp_path):
    result = subprocess.run(
        [sys.executable, "train.py", "--config", "configs/tiny.yaml", *tiny_overrides(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "devices: 1 x" in result.stdout and "sample:" in result.stdout
    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_lines = [r for r in records if "train_loss" in r]
    assert {"step", "train_loss", "lr", "grad_norm", "tokens_per_sec"} <= set(train_lines[0])
    assert [r["step"] for r in records if "val_loss" in r] == [20, 40]
    assert (run / "config.yaml").exists()
    assert checkpoint_steps(run) == [20, 40]


def test_cli_reports_a_config_typo_and_exits_non_zero(tmp_path):
    result = subprocess.run(
        [sys.executable, "train.py", "--config", "configs/tiny.yaml", "train.max_step=3"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "did you mean 'max_steps'" in result.stderr
