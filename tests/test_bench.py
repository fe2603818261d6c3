"""bench.py on a tiny CPU model, so the benchmark cannot rot unnoticed, and its nanoGPT
comparison's plumbing (nanoGPT's bench.py itself needs PyTorch and a CUDA GPU, so a stand-in
script prints its output format here)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import sys
import textwrap
from pathlib import Path

import jax
import pytest

from jaxgpt2.model import GPT
from runs import ROOT

_spec = importlib.util.spec_from_file_location("bench", ROOT / "bench.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

# Constructed from the print statements of nanoGPT's bench.py (its configurator's
# "Overriding" lines, model.py's parameter count and configure_optimizers lines, then
# "k/num_steps loss" per step over 10 burn-in and 20 timed steps, then one "time per
# iteration" line), not captured from a GPU run: third_party/nanoGPT is a plain copy of
# karpathy/nanoGPT without its own .git, so no commit hash can be given. The numbers are
# consistent: GPT-2 124M without biases at batch 32 x 1024, 68.0312 ms, MFU vs an A100.
_OVERRIDES = ["batch_size = 32", "block_size = 1024", "bias = False", "real_data = False",
              "dtype = bfloat16", "device = cuda", "compile = True", "profile = False"]
_BURN_IN = [f"{k}/10 loss: {10.9959 - 0.01 * k:.4f}" for k in range(10)]
_TIMED = [f"{k}/20 loss: {10.8959 - 0.01 * k:.4f}" for k in range(20)]
NANOGPT_SAMPLE = "\n".join([
    *(f"Overriding: {o}" for o in _OVERRIDES),
    "number of parameters: 123.59M",
    "num decayed parameter tensors: 50, with 124,354,560 parameters",
    "num non-decayed parameter tensors: 25, with 19,200 parameters",
    "using fused AdamW: True",
    "Compiling model...",
    *_BURN_IN, *_TIMED,
    "time per iteration: 68.0312ms, MFU: 131.96%",
]) + "\n"

# One variant, few steps; both tests share batch 2 without biases, so the second one's
# compile is a hit in the session's persistent cache (tests/conftest.py).
TINY_RUN = ["--preset", "tiny", "--block_size", "32", "--steps", "2", "--warmup", "1",
            "--variants", "loop", "--no-bias"]


def fake_nanogpt(folder: Path, body: str) -> Path:
    """A folder shaped like a nanoGPT clone whose bench.py runs ``body`` (after recording
    its arguments and checking it was started in its own folder, as nanoGPT needs)."""
    folder.mkdir()
    (folder / "configurator.py").write_text("# stand-in\n")
    (folder / "sample.txt").write_text(NANOGPT_SAMPLE)
    (folder / "bench.py").write_text(textwrap.dedent("""\
        import json, sys
        open('configurator.py').read()  # nanoGPT reads it from its working directory
        with open('argv.jsonl', 'a') as f:
            f.write(json.dumps(sys.argv[1:]) + '\\n')
        """) + textwrap.dedent(body))
    return folder


def test_parse_nanogpt_output_reads_the_timed_mean_and_losses():
    parsed = bench.parse_nanogpt_output(NANOGPT_SAMPLE)
    assert parsed["ms_per_step"] == 68.0312
    assert parsed["mfu_a100_own"] == pytest.approx(1.3196)
    assert parsed["first_loss"] == 10.9959 and parsed["last_loss"] == pytest.approx(10.7059)
    assert parsed["nanogpt_params_m"] == 123.59
    with pytest.raises(ValueError, match="time per iteration"):
        bench.parse_nanogpt_output("\n".join(_BURN_IN))


def test_nanogpt_command_passes_our_settings_as_configurator_overrides():
    cfg = bench.base_config(bench.build_parser().parse_args(["--no-bias", "--block_size", "512"]))
    cfg = dataclasses.replace(cfg, dtype="bfloat16")
    assert bench.nanogpt_command(64, cfg) == [
        sys.executable, "bench.py", "--batch_size=64", "--block_size=512", "--bias=False",
        "--real_data=False", "--dtype=bfloat16", "--device=cuda", "--compile=True",
        "--profile=False"]


def test_batch_list_and_bias_flags():
    parse = bench.build_parser().parse_args
    assert parse(["--batch_size", "32,64"]).batch_size == [32, 64]
    assert parse([]).batch_size == [32]
    for bad in ("0", "a,2", ","):
        with pytest.raises(SystemExit):
            parse(["--batch_size", bad])
    assert bench.base_config(parse(["--preset", "gpt2"])).bias  # GPT-2 has biases
    assert not bench.base_config(parse(["--no-bias"])).bias
    assert bench.base_config(parse(["--bias"])).bias


def _param_shapes(args: list[str]) -> dict:
    cfg = bench.base_config(bench.build_parser().parse_args(args))
    return jax.eval_shape(GPT(cfg).init_params, jax.random.PRNGKey(0))


def test_tiny_cpu_run_with_a_batch_list_and_no_bias(tmp_path, capsys):
    """Both batch sizes get a row with positive numbers, in the table and the JSON, and
    --no-bias measures a model without a single bias leaf."""
    out = tmp_path / "bench.json"
    bench.run([*TINY_RUN, "--batch_size", "1,2", "--json", str(out)])
    stdout = capsys.readouterr().out
    assert "tiny, batch 1,2 x 32, text tokens, bias False" in stdout
    rows = json.loads(out.read_text())["rows"]
    assert [(r["variant"], r["batch_size"], r["bias"]) for r in rows] == [
        ("loop", 1, False), ("loop", 2, False)]
    for r in rows:
        assert r["ms_per_step"] > 0 and r["tokens_per_sec"] > 0 and r["mfu"] > 0
        assert math.isfinite(r["first_loss"]) and math.isfinite(r["last_loss"])
        assert f"{r['tokens_per_sec']:,.0f}" in stdout
    tiny = ["--preset", "tiny", "--block_size", "32"]
    with_bias, without = _param_shapes(tiny), _param_shapes([*tiny, "--no-bias"])
    count = lambda tree: sum(math.prod(x.shape) for x in jax.tree.leaves(tree))  # noqa: E731
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(without)]
    assert not [p for p in paths if "bias" in p]
    assert rows[0]["param_count"] == count(without) < count(with_bias)


def test_compare_runs_nanogpt_alternately_and_prints_the_ratio(tmp_path, capsys, monkeypatch):
    """The whole --compare_nanogpt path with a stand-in nanoGPT that prints its format
    (the tiny model allowed in place of the GPT-2 124M that nanoGPT hard-codes)."""
    folder = fake_nanogpt(tmp_path / "nanoGPT", "print(open('sample.txt').read(), end='')\n")
    monkeypatch.setattr(bench, "NANOGPT_SIZES", bench.TINY)
    monkeypatch.setenv("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    report = bench.run([*TINY_RUN, "--batch_size", "2", "--repeats", "2",
                        "--compare_nanogpt", str(folder)])
    stdout = capsys.readouterr().out
    assert "tokens: random (forced by --compare_nanogpt" in stdout
    assert [s["program"] for s in report["samples"]] == ["jaxgpt2", "nanoGPT", "nanoGPT",
                                                         "jaxgpt2"]
    nano = [r for r in report["rows"] if r["program"] == "nanoGPT"]
    assert len(nano) == 1 and nano[0]["ms_per_step"] == 68.0312
    assert nano[0]["tokens_per_sec"] == pytest.approx(2 * 32 / 0.0680312)
    assert bench.NANOGPT_ROW in stdout and "ours / nanoGPT tokens/s" in stdout
    (ratio,) = report["ratios"]
    assert ratio["ratio"] == pytest.approx(ratio["ours_tokens_per_sec"] / nano[0]["tokens_per_sec"])
    assert f"{ratio['ratio']:.3f}x" in stdout
    argv = [json.loads(line) for line in (folder / "argv.jsonl").read_text().splitlines()]
    assert argv == [["--batch_size=2", "--block_size=32", "--bias=False", "--real_data=False",
                     "--dtype=float32", "--device=cuda", "--compile=True", "--profile=False"]] * 2


def test_compare_errors_are_one_line_with_the_fix(tmp_path, capsys):
    assert bench.main(["--compare_nanogpt", str(tmp_path / "missing")]) == 1
    assert "clone karpathy/nanoGPT into third_party/nanoGPT" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert bench.main(["--compare_nanogpt", str(tmp_path / "empty")]) == 1
    assert "has no bench.py" in capsys.readouterr().err
    folder = fake_nanogpt(tmp_path / "nanoGPT", "")
    assert bench.main(["--preset", "tiny", "--compare_nanogpt", str(folder)]) == 1
    assert "needs --preset gpt2" in capsys.readouterr().err
    assert bench.main(["--tokens", "text", "--compare_nanogpt", str(folder)]) == 1
    assert "use --tokens random" in capsys.readouterr().err


def test_a_failing_nanogpt_gives_the_fix_not_a_traceback(tmp_path):
    folder = fake_nanogpt(tmp_path / "nanoGPT", """\
        print("ModuleNotFoundError: No module named 'torch'", file=sys.stderr)
        sys.exit(1)
        """)
    cfg = bench.base_config(bench.build_parser().parse_args([]))
    with pytest.raises(bench.NanoGPTError, match="needs PyTorch with CUDA in this interpreter"):
        bench.run_nanogpt(folder, 2, cfg)
    (folder / "bench.py").write_text("print('0/10 loss: 10.9')\n")
    with pytest.raises(bench.NanoGPTError, match="no 'time per iteration"):
        bench.run_nanogpt(folder, 2, cfg)
