"""``train.auto_batch``: the largest micro-batch per device whose compiled step fits a
memory budget, on the CPU with an artificial budget (``train.auto_batch_memory_gb``)."""

import io
import types
from contextlib import redirect_stdout
from pathlib import Path

import jax
import pytest

from jaxgpt2.auto_batch import GIB, choose_micro_batch, memory_budget, step_bytes
from jaxgpt2.config import load_config
from jaxgpt2.errors import ConfigError
from jaxgpt2.summary import size_text
from jaxgpt2.trainer import Trainer
from runs import TINY, losses, tiny_config

# configs/tiny.yaml's global batch is 8 rows (data.batch_size=8, train.grad_accum=1):
# candidates 1, 2, 4 and 8 rows per device.
ROWS = 8
SHORT = ("train.max_steps=4", "train.eval_interval=4", "train.save_interval=4",
         "train.log_interval=1", "train.eval_steps=1", "train.sample_tokens=0")


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> tuple[Trainer, dict[int, int]]:
    """A tiny run's trainer (never run) and its step's real compiled bytes at micro-batches
    1, 2 and 4; the programs land in the session's compilation cache, so the searches
    below (which never need 8 under a budget below 4's bytes) compile them again quickly."""
    trainer = Trainer(tiny_config(tmp_path_factory.mktemp("auto_batch"), "sizes", *SHORT))
    trainer.lock.release()
    sizes = {m: step_bytes(trainer.compile_step_at(m)) for m in (1, 2, 4)}
    assert sizes[1] < sizes[2] < sizes[4]
    return trainer, sizes


def between(sizes: dict[int, int], small: int, large: int) -> int:
    return (sizes[small] + sizes[large]) // 2


def test_a_budget_between_two_real_sizes_chooses_the_smaller_and_never_one_over(measured):
    trainer, sizes = measured
    budget = between(sizes, 2, 4)
    micro, compiled, tried = choose_micro_batch(trainer.compile_step_at, ROWS, budget)
    assert micro == 2 and step_bytes(compiled) == sizes[2] <= budget
    assert dict(tried) == {m: sizes[m] for m, _ in tried}  # what was measured is real
    assert 4 in dict(tried)  # the next larger was compiled and measured over the budget
    exact, _, _ = choose_micro_batch(trainer.compile_step_at, ROWS, sizes[2])
    assert exact == 2  # a budget of exactly a step's bytes fits it


@pytest.mark.parametrize("curve, compiles", [
    (lambda m: 1000 + 37 * m, 4), (lambda m: 1000 + 37 * m + m * m / 20, 4),
    (lambda m: 1000 + 300 * m ** 0.5, None), (lambda m: 1000 + 2 ** (m / 40), None),
], ids=["affine", "convex", "concave", "exponential"])
@pytest.mark.parametrize("rows", [1, 7, 480, 512])
def test_the_search_finds_the_largest_fitting_divisor_of_any_growing_memory(curve, compiles,
                                                                            rows):
    """The search against every budget, by brute force: on memory near affine (as XLA's
    is) in at most four compiles; on curves far from it, in more."""
    def compile_at(m):
        return types.SimpleNamespace(memory_analysis=lambda: types.SimpleNamespace(
            argument_size_in_bytes=int(curve(m)), output_size_in_bytes=0, alias_size_in_bytes=0,
            temp_size_in_bytes=0, generated_code_size_in_bytes=0))
    divisors = [d for d in range(1, rows + 1) if rows % d == 0]
    for budget in sorted({int(curve(d)) + extra for d in divisors for extra in (-1, 0)}):
        fitting = [d for d in divisors if int(curve(d)) <= budget]
        if not fitting:
            with pytest.raises(ConfigError):
                choose_micro_batch(compile_at, rows, budget)
            continue
        micro, _, tried = choose_micro_batch(compile_at, rows, budget)
        assert micro == fitting[-1]
        assert compiles is None or len(tried) <= compiles


def test_a_budget_below_micro_batch_1_says_what_it_needs_and_what_to_do(measured):
    trainer, sizes = measured
    with pytest.raises(ConfigError, match=r"needs 1\.\d MiB per device even at micro-batch 1, "
                                          r"over the budget of .*model\.remat=full"):
        choose_micro_batch(trainer.compile_step_at, ROWS, sizes[1] - 1)


@pytest.fixture(scope="module")
def auto_run(measured, tmp_path_factory) -> tuple[Path, tuple[str, ...], Trainer, str]:
    """A short run with ``train.auto_batch`` and a budget between micro-batch 2's and 4's
    bytes: its folder's parent, overrides, trainer and printed text."""
    _, sizes = measured
    base = tmp_path_factory.mktemp("auto_run")
    overrides = (*SHORT, "train.auto_batch=true",
                 f"train.auto_batch_memory_gb={between(sizes, 2, 4) / GIB!r}")
    with redirect_stdout(io.StringIO()) as printed:
        trainer = Trainer(tiny_config(base, "auto", *overrides))
        trainer.run()
    return base, overrides, trainer, printed.getvalue()


def test_an_auto_batch_run_trains_as_the_same_split_set_by_hand(measured, auto_run, run_config):
    _, sizes = measured
    base, overrides, auto, printed = auto_run
    assert (auto.config.data.batch_size, auto.config.train.grad_accum) == (2, 4)
    budget = size_text(between(sizes, 2, 4))
    assert (f"auto batch: micro-batch 2 per device x 4 accumulation (global 8); step needs "
            f"{size_text(sizes[2])} of {budget} budget (tried 1: {size_text(sizes[1])}, 2: "
            f"{size_text(sizes[2])}, 4: {size_text(sizes[4])})") in printed
    assert "micro-batch 2 per device x 1 devices x 4 accumulation" in printed  # start-up line
    hand = Trainer(run_config("hand", *SHORT, "data.batch_size=2", "train.grad_accum=4"))
    hand.run()
    Trainer(run_config("configured", *SHORT)).run()
    assert losses(base / "auto") == losses(hand.out_dir)  # bit for bit
    assert losses(base / "auto") == pytest.approx(losses(hand.out_dir.parent / "configured"),
                                                  rel=1e-5)  # the same rows, summed otherwise
    recorded = (base / "auto" / "config.yaml").read_text()
    assert "batch_size: 2\n" in recorded and "grad_accum: 4\n" in recorded


def test_an_auto_batch_run_resumes_with_its_split_and_refuses_another_model_first(auto_run):
    base, overrides, _, _ = auto_run
    with redirect_stdout(io.StringIO()) as printed:
        with pytest.raises(ConfigError, match="cannot resume: .*model.n_embd: checkpoint 32"):
            Trainer(tiny_config(base, "auto", *overrides, "train.resume=true", "model.n_embd=64"))
    assert "auto batch" not in printed.getvalue()  # refused before compiling anything
    with redirect_stdout(io.StringIO()) as printed:
        summary = Trainer(tiny_config(base, "auto", *overrides, "train.resume=true",
                                      "train.max_steps=6")).run()
    assert summary["step"] == 6
    assert "resume: train.max_steps changed from 4 to 6" in printed.getvalue()
    assert "batch_size changed" not in printed.getvalue()
    assert "grad_accum changed" not in printed.getvalue()


def test_on_the_cpu_without_a_budget_the_run_stops_before_making_its_folder(run_config):
    config = run_config("run", "train.auto_batch=true")
    with pytest.raises(ConfigError, match=r"the cpu device does not report its memory; set "
                                          r"train\.auto_batch_memory_gb=<GiB per device>"):
        Trainer(config)
    assert not Path(config.train.out_dir).exists()


def test_the_budget_is_the_given_gib_or_a_fraction_of_what_the_device_reports():
    cpu = jax.devices("cpu")[0]
    assert memory_budget(cpu, 0.9, 1.5) == int(1.5 * GIB)
    gpu = types.SimpleNamespace(platform="gpu", memory_stats=lambda: {"bytes_limit": 100 * GIB})
    assert memory_budget(gpu, 0.9, None) == 90 * GIB
    assert memory_budget(gpu, 0.9, 2.0) == 2 * GIB


@pytest.mark.parametrize("overrides, message", [
    (["train.auto_batch=true", "train.auto_batch_memory_gb=0"],
     r"train\.auto_batch_memory_gb must be positive \(GiB per device\), got 0\.0"),
    (["train.auto_batch=true", "train.auto_batch_fraction=0"], r"must be in \(0, 1\], got 0\.0"),
    (["train.auto_batch=true", "train.auto_batch_fraction=1.5"], r"must be in \(0, 1\], got 1\.5"),
    (["train.auto_batch_memory_gb=4"], r"apply only with train\.auto_batch=true"),
    (["train.auto_batch_fraction=0.5"], r"apply only with train\.auto_batch=true"),
    (["train.auto_batch=true", "train.auto_batch_memory_gb=4", "train.auto_batch_fraction=0.5"],
     r"train\.auto_batch_memory_gb replaces that; set one of them"),
    (["train.auto_batch=yes please"], r"train\.auto_batch: expected bool"),
])
def test_auto_batch_settings_are_checked_when_the_config_loads(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TINY, overrides)


def test_valid_auto_batch_settings_load_with_the_budget_in_gib():
    config = load_config(TINY, ["train.auto_batch=true", "train.auto_batch_memory_gb=2"])
    assert config.train.auto_batch_memory_gb == 2.0 and config.train.auto_batch_fraction == 0.9
    config = load_config(TINY, ["train.auto_batch=true", "train.auto_batch_fraction=1"])
    assert config.train.auto_batch_fraction == 1.0 and config.train.auto_batch_memory_gb is None
    assert load_config(TINY).train.auto_batch is False
