"""What a user sees: the start-up numbers, metrics.jsonl's schema, plain lines off a
terminal, TensorBoard and W&B writers, samples and plots."""

from __future__ import annotations

import importlib.util
import json
import os
import struct
import subprocess
import sys

import pytest

from jaxgpt2.config import PRESETS, GPTConfig
from jaxgpt2.plot import main as plot_main
from jaxgpt2.summary import flops_per_token, parameter_counts
from jaxgpt2.trainer import Trainer
from runs import ROOT, tiny_config, tiny_overrides

GPT2 = GPTConfig(vocab_size=50257, block_size=1024, **PRESETS["gpt2"])


def test_gpt2_124m_has_124_439_808_parameters_with_tied_embeddings():
    counts = parameter_counts(GPT2)
    assert counts["total"] == 124_439_808
    assert counts["non_embedding"] == 124_439_808 - 50257 * 768 - 1024 * 768


def test_flops_per_token_is_6n_plus_12ltc_without_position_embeddings():
    n = 124_439_808 - 1024 * 768
    assert flops_per_token(GPT2) == 6 * n + 12 * 12 * 1024 * 768


def test_the_parameter_count_matches_the_model_without_bias_too():
    import jax
    from jaxgpt2.model import GPT
    for bias in (True, False):
        cfg = GPTConfig(vocab_size=128, block_size=16, n_layer=2, n_head=2, n_embd=32, bias=bias)
        params = jax.eval_shape(GPT(cfg).init_params, jax.random.PRNGKey(0))
        assert parameter_counts(cfg)["total"] == sum(x.size for x in jax.tree.leaves(params))


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory):
    """A short run with TensorBoard and samples at each evaluation, output to a file."""
    base = tmp_path_factory.mktemp("reporting")
    overrides = tiny_overrides(base, "run", "train.max_steps=12", "train.log_interval=3",
                               "train.eval_interval=6", "train.sample_tokens=0",
                               "train.eval_sample_tokens=8", "train.tensorboard=true",
                               "train.progress=true")
    with open(base / "out.txt", "w") as out:
        subprocess.run([sys.executable, "train.py", "--config", "configs/tiny.yaml", *overrides],
                       cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, check=True, timeout=300)
    return base


def test_off_a_terminal_the_log_is_one_plain_line_per_log_interval(logged_run):
    text = (logged_run / "out.txt").read_text()
    assert "\r" not in text
    steps = [line.split()[1] for line in text.splitlines() if line.startswith("step ") and "/" in
             line.split()[1]]
    assert steps == ["3/12", "6/12", "9/12", "12/12"]
    assert "compiling the train step..." in text and "compiled in " in text


def test_metrics_jsonl_has_one_schema_for_steps_and_one_for_evaluations(logged_run):
    rows = [json.loads(line) for line in (logged_run / "run/metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "train_loss" in r]
    assert [r["step"] for r in train_rows] == [3, 6, 9, 12]
    assert all(set(r) == {"step", "train_loss", "lr", "grad_norm", "tokens_per_sec"}
               for r in train_rows)
    val_rows = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in val_rows] == [6, 12]
    assert all(set(r) == {"step", "val_loss"} for r in val_rows)


def _tensorboard_scalars(folder) -> dict[str, list[tuple[int, float]]]:
    """Scalars of a TensorBoard event file, read from its TFRecord framing."""
    from tensorboardX.proto import event_pb2
    scalars: dict[str, list[tuple[int, float]]] = {}
    for file in folder.glob("events.out.tfevents.*"):
        data = file.read_bytes()
        at = 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at:at + 8])
            event = event_pb2.Event.FromString(data[at + 12:at + 12 + length])
            at += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


@pytest.mark.skipif(importlib.util.find_spec("tensorboardX") is None,
                    reason="the [tensorboard] extra is not installed")
def test_every_jsonl_metric_reaches_tensorboard(logged_run):
    scalars = _tensorboard_scalars(logged_run / "run/tensorboard")
    rows = [json.loads(line) for line in (logged_run / "run/metrics.jsonl").read_text().splitlines()]
    for key in ("train_loss", "lr", "grad_norm", "tokens_per_sec", "val_loss"):
        expected = [(r["step"], r[key]) for r in rows if key in r]
        assert [s for s, _ in scalars[key]] == [s for s, _ in expected]
        assert [v for _, v in scalars[key]] == pytest.approx([v for _, v in expected], rel=1e-6)


def test_each_evaluation_appends_a_sample_and_the_run_draws_its_loss_plot(logged_run):
    samples = (logged_run / "run/samples.txt").read_text()
    assert "=== step 6, sample 0 ===" in samples and "=== step 12, sample 0 ===" in samples
    if importlib.util.find_spec("matplotlib") is not None:
        assert (logged_run / "run/loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None,
                    reason="the [plot] extra is not installed")
def test_the_plot_command_draws_two_runs_into_one_png(logged_run, tmp_path, capsys):
    second = tmp_path / "second"
    Trainer(tiny_config(tmp_path, "second", "train.max_steps=6", "train.eval_interval=3",
                        "train.sample_tokens=0", "train.plot=false")).run()
    out = tmp_path / "both.png"
    assert plot_main([str(logged_run / "run"), str(second), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (second / "loss.png").exists()  # train.plot=false draws none
    assert plot_main([str(tmp_path / "nowhere"), "--out", str(out)]) == 1
    assert "not a run folder" in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None,
                    reason="the [wandb] extra is not installed")
def test_wandb_without_an_api_key_writes_offline_files_and_never_prompts(tmp_path):
    env_overrides = tiny_overrides(tmp_path, "run", "train.max_steps=4", "train.eval_interval=2",
                                   "train.sample_tokens=0", "train.wandb_project=jaxgpt2-test")
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB")}
    env["HOME"] = str(tmp_path)  # no ~/.netrc key
    subprocess.run([sys.executable, "train.py", "--config", "configs/tiny.yaml", *env_overrides],
                   cwd=ROOT, check=True, timeout=300, stdin=subprocess.DEVNULL, env=env)
    offline = list((tmp_path / "run/wandb").glob("offline-run-*"))
    assert len(offline) == 1 and list(offline[0].glob("*.wandb"))


def test_a_writer_whose_extra_is_missing_is_refused_at_config_load(monkeypatch):
    from jaxgpt2.config import load_config
    from jaxgpt2.errors import ConfigError
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "tensorboardX" else real(name, *a))
    with pytest.raises(ConfigError, match=r"train.tensorboard needs the tensorboardX package: "
                                          r"pip install 'jaxgpt2\[tensorboard\]'"):
        load_config("configs/tiny.yaml", ["train.tensorboard=true"])
