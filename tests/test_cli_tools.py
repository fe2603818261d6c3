"""sample.py, jaxgpt2.evaluate, jaxgpt2.export and configs/shakespeare.yaml on real run
folders (a few steps of configs/tiny.yaml) and the Hugging Face golden fixtures."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxgpt2 import evaluate, export
from jaxgpt2.config import load_config
from jaxgpt2.errors import CheckpointError
from jaxgpt2.generate import generate
from jaxgpt2.hf import load_pretrained
from jaxgpt2.load import TOKENIZER_NAME, load
from jaxgpt2.model import GPT
from jaxgpt2.tokenizer import GPT2Tokenizer
from jaxgpt2.trainer import Trainer
from runs import ROOT, tiny_config

GOLDEN_HF = ROOT / "tests/golden/l2_h2_e16_p64"


def import_script(name: str):
    """A top-level script as a module (the repo root need not be on sys.path)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


sample = import_script("sample")


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """The module's folder: the run in ``base/run``, its data cache in ``base/data``."""
    return tmp_path_factory.mktemp("cli_tools")


@pytest.fixture(scope="module")
def data_dir(base) -> Path:
    data = base / "data"
    data.mkdir()
    return data


@pytest.fixture(scope="module")
def run(base, data_dir):
    """A 4-step char-level run (its data in ``data_dir``) with checkpoints at steps 2
    and 4; its trainer holds the final parameters to compare restored ones against."""
    trainer = Trainer(tiny_config(base, "run", "train.max_steps=4", "train.save_interval=2",
                                  "train.eval_interval=2", "train.eval_steps=2",
                                  "train.sample_tokens=0"))
    trainer.run()
    return base / "run", trainer


def assert_trees_equal(a, b) -> None:
    la, lb = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_flatten_with_path(b)[0]
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (path, x), (_, y) in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


# ----------------------------------------------------------------------------- load


def test_load_restores_the_latest_checkpoints_params_exactly(run):
    out, trainer = run
    loaded = load(out)
    assert loaded.source == out / "checkpoints" / "4"
    assert (loaded.config.n_layer, loaded.config.vocab_size) == (2, 65)
    assert loaded.tokenizer().decode(loaded.tokenizer().encode("ROMEO:")) == "ROMEO:"
    assert_trees_equal(loaded.params, jax.device_get(trainer.state.params))
    assert load(out / "checkpoints" / "2").source.name == "2"


def test_load_names_what_a_checkpoint_argument_may_be(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a run folder"):
        load(tmp_path)
    assert list(tmp_path.iterdir()) == [], "reading must not create folders"
    with pytest.raises(FileNotFoundError, match="not a run folder"):
        load(tmp_path / "typo")
    assert not (tmp_path / "typo").exists()


def damaged_copy(run_dir: Path, tmp_path: Path, item: str) -> Path:
    """A copy of ``run_dir`` whose latest checkpoint's ``item`` (meta or state) has every
    file cut to a third."""
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    for file in (copy / "checkpoints" / "4" / item).rglob("*"):
        if file.is_file() and file.stat().st_size > 0:
            file.write_bytes(file.read_bytes()[: file.stat().st_size // 3])
    return copy


@pytest.mark.parametrize("item", ["meta", "state"])
def test_tools_report_a_damaged_checkpoint_and_name_the_previous_one(run, tmp_path, capsys, item):
    copy = damaged_copy(run[0], tmp_path, item)
    with pytest.raises(CheckpointError, match=r"checkpoints/4 cannot be read.*checkpoints/2"):
        load(copy)
    assert sample.main(["--checkpoint", str(copy), "--max_new_tokens", "2"]) == 1
    assert "checkpoints/4 cannot be read" in capsys.readouterr().err
    assert export.main([str(copy), str(tmp_path / "hf")]) == 1
    assert "checkpoints/4 cannot be read" in capsys.readouterr().err
    assert load(copy / "checkpoints" / "2").source.name == "2"  # the one it names opens


# ----------------------------------------------------------------------------- sample.py


def test_sample_prints_num_samples_continuations_of_the_prompt(run, capsys):
    out, _ = run
    assert sample.main(["--checkpoint", str(out), "--prompt", "ROMEO:", "--max_new_tokens",
                        "12", "--num_samples", "3", "--seed", "1"]) == 0
    texts = capsys.readouterr().out.split(sample.SEPARATOR + "\n")
    assert texts[-1] == "" and len(texts) == 4
    for text in texts[:3]:
        assert text.startswith("ROMEO:") and len(text) == len("ROMEO:") + 12 + 1  # + newline


def test_sample_greedy_equals_generate_on_the_trained_params(run, capsys):
    out, trainer = run
    tok = trainer.dataset.tokenizer()
    ids = generate(trainer.model, jax.device_get(trainer.state.params),
                   np.array([tok.encode("To be")]), 40, temperature=0.0)
    assert sample.main(["--checkpoint", str(out), "--prompt", "To be", "--max_new_tokens",
                        "40", "--temperature", "0"]) == 0
    assert capsys.readouterr().out == tok.decode(ids[0]) + "\n" + sample.SEPARATOR + "\n"


def test_sample_on_a_hugging_face_folder_uses_gpt2_bpe(capsys):
    config, params = load_pretrained(GOLDEN_HF)
    tok = GPT2Tokenizer()
    ids = generate(GPT(config), params, np.array([tok.encode("Hello world")]), 5, temperature=0.0)
    assert sample.main(["--checkpoint", str(GOLDEN_HF), "--prompt", "Hello world",
                        "--max_new_tokens", "5", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith(tok.decode(ids[0]) + "\n")


def test_sample_reports_a_prompt_outside_the_char_vocabulary(run, capsys):
    out, _ = run
    assert sample.main(["--checkpoint", str(out), "--prompt", "€"]) == 1
    assert "not in this character vocabulary" in capsys.readouterr().err


def test_sample_refuses_an_empty_prompt_with_no_endoftext_to_start_from(run, capsys):
    out, _ = run
    assert sample.main(["--checkpoint", str(out), "--prompt", ""]) == 1
    assert "prompt is empty and the 'char' vocabulary has no <|endoftext|>" in capsys.readouterr().err


def test_sample_cli_runs_as_a_script(run):
    out, _ = run
    result = subprocess.run([sys.executable, "sample.py", "--checkpoint", str(out), "--prompt",
                             "A", "--max_new_tokens", "5"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("A") and sample.SEPARATOR in result.stdout


# ----------------------------------------------------------------------------- evaluate


def test_evaluate_reproduces_the_val_loss_the_trainer_logged(run, data_dir, capsys):
    out, _ = run
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    val_loss = [r["val_loss"] for r in logged if r.get("step") == 4 and "val_loss" in r][0]
    assert evaluate.main(["--checkpoint", str(out), "--data", "shakespeare_char",
                          "--cache_dir", str(data_dir)]) == 0
    printed = capsys.readouterr().out
    loss = float(re.search(r"val loss (\S+)", printed).group(1))
    perplexity = float(re.search(r"perplexity (\S+)", printed).group(1))
    assert abs(loss - val_loss) < 1e-4, (printed, val_loss)
    assert abs(perplexity - np.exp(val_loss)) < 0.01
    assert "2 batches x 8 x 32" in printed  # the run's eval_steps, batch_size, block_size


def test_evaluate_options_choose_split_batches_and_window(run, data_dir, capsys):
    out, _ = run
    assert evaluate.main(["--checkpoint", str(out), "--data", "shakespeare_char", "--cache_dir",
                          str(data_dir), "--split", "train", "--batches", "3", "--batch_size",
                          "4", "--block_size", "16"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("train loss") and "3 batches x 4 x 16" in printed
    assert "192 tokens scored" in printed


def test_evaluate_reads_only_the_split_it_scores(run, data_dir, tmp_path, capsys):
    out, _ = run
    data = tmp_path / "val_only"
    shutil.copytree(data_dir / "shakespeare_char", data)
    (data / "train.bin").unlink()
    assert evaluate.main(["--checkpoint", str(out), "--data", str(data)]) == 0
    assert capsys.readouterr().out.startswith("val loss")
    assert evaluate.main(["--checkpoint", str(out), "--data", str(data), "--split", "train"]) == 1
    assert "train.bin is missing or empty" in capsys.readouterr().err


def test_evaluate_refuses_data_in_another_tokenization(run, data_dir, capsys):
    out, _ = run
    assert evaluate.main(["--checkpoint", str(out), "--data", "shakespeare",
                          "--cache_dir", str(data_dir), "--batches", "1"]) == 1
    assert "vocabulary of 50257, larger than the model's 65" in capsys.readouterr().err


# ----------------------------------------------------------------------------- export


def test_export_round_trips_run_to_hf_with_the_same_logits(run, tmp_path, capsys):
    out, trainer = run
    assert export.main([str(out), str(tmp_path / "hf")]) == 0
    assert "wrote" in capsys.readouterr().out
    config, params = load_pretrained(tmp_path / "hf")
    assert (config.n_layer, config.n_embd, config.vocab_size, config.block_size) == (2, 32, 65, 32)
    ids = np.random.default_rng(0).integers(0, 65, (2, 32))
    ours = trainer.model.apply({"params": jax.device_get(trainer.state.params)}, ids)
    theirs = GPT(config).apply({"params": params}, ids)
    np.testing.assert_array_equal(np.asarray(theirs), np.asarray(ours))
    # The char vocabulary travels with it, so the exported folder samples the same text.
    assert json.loads((tmp_path / "hf" / TOKENIZER_NAME).read_text())["tokenizer"] == "char"
    argv = ["--prompt", "KING", "--max_new_tokens", "8", "--temperature", "0"]
    assert sample.main(["--checkpoint", str(tmp_path / "hf"), *argv]) == 0
    from_hf = capsys.readouterr().out
    assert sample.main(["--checkpoint", str(out), *argv]) == 0
    assert capsys.readouterr().out == from_hf


def test_gpt_from_pretrained_and_save_pretrained_round_trip(tmp_path):
    model, params = GPT.from_pretrained(GOLDEN_HF)
    assert model.save_pretrained(params, tmp_path / "again") == tmp_path / "again"
    again, params_again = GPT.from_pretrained(tmp_path / "again")
    assert again.config == model.config
    assert_trees_equal(params_again, params)


def test_export_reports_a_missing_run(tmp_path, capsys):
    assert export.main([str(tmp_path / "nothing"), str(tmp_path / "hf")]) == 1
    assert "not a run folder" in capsys.readouterr().err


# ----------------------------------------------------------------------------- configs/shakespeare.yaml


def test_shakespeare_config_is_nanogpts_finetune_recipe():
    config = load_config(ROOT / "configs/shakespeare.yaml")
    assert config.data.dataset == "shakespeare" and config.model.init_from
    assert (config.data.batch_size, config.train.grad_accum, config.model.block_size) == (1, 32, 1024)
    assert (config.optim.lr, config.optim.schedule, config.optim.warmup_steps) == (3e-5, "constant", 0)
    assert (config.train.max_steps, config.train.eval_interval) == (20, 5)


def test_shakespeare_config_fine_tunes_from_a_hugging_face_folder(tmp_path, data_dir):
    """Two steps from the golden tiny GPT-2: the run starts from its weights (a constant
    3e-5 Adam step moves no weight by more than ~3e-5 a step) and crops its positions;
    it then resumes without the folder it started from (the checkpoint holds the weights)."""
    out, hf = tmp_path / "ft", tmp_path / "gpt2"
    shutil.copytree(GOLDEN_HF, hf)
    overrides = [f"model.init_from={hf}", "model.block_size=32", "train.grad_accum=2",
                 "train.eval_interval=2", "train.eval_steps=1", "train.sample_tokens=0",
                 "train.progress=false", f"train.out_dir={out}", f"data.cache_dir={data_dir}"]
    result = subprocess.run(
        [sys.executable, "train.py", "--config", "configs/shakespeare.yaml", "train.max_steps=2",
         *overrides], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    _, pretrained = load_pretrained(hf)
    pretrained["wpe"]["embedding"] = pretrained["wpe"]["embedding"][:32]
    tuned = load(out).params
    moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()), tuned, pretrained)
    assert 0 < max(jax.tree.leaves(moved)) < 1e-4, moved
    shutil.rmtree(hf)
    resumed = Trainer(load_config(ROOT / "configs/shakespeare.yaml",
                                  [*overrides, "train.max_steps=4", "train.resume=true"]))
    assert int(resumed.state.step) == 2
    assert_trees_equal(jax.device_get(resumed.state.params), tuned)


def test_bench_runs_on_the_cpu_and_reports_each_variant(tmp_path):
    """bench.py on a tiny model, so the benchmark script cannot rot unnoticed."""
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench.py"), "--preset", "tiny",
                           "--batch_size", "2", "--block_size", "32", "--steps", "2",
                           "--warmup", "1", "--variants", "loop,scan", "--json", str(out)],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr
    assert "text tokens" in proc.stdout
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"loop", "scan"}
    for r in results.values():
        assert r["tokens_per_sec"] > 0 and np.isfinite(r["last_loss"])
    assert results["loop"]["first_loss"] == pytest.approx(results["scan"]["first_loss"], rel=1e-5)


def test_bench_text_tokens_repeat_like_real_text():
    bench = import_script("bench")
    text = bench.token_windows("text", 8, 256, 50257)
    rand = bench.token_windows("random", 8, 256, 50257)
    assert text.shape == rand.shape == (1, 8, 257)
    assert np.bincount(text.ravel()).max() > 10 * np.bincount(rand.ravel()).max()
