"""Failures: killed saves, corrupt checkpoints, bad folders; clear errors, nothing lost."""

import os
import signal
import subprocess
import sys

import pytest

from jaxgpt2.errors import CheckpointError, ConfigError
from jaxgpt2.trainer import Trainer
from runs import ROOT, checkpoint_steps, losses, train_process, wait_for_step


def test_sigkill_during_saves_resumes_from_a_complete_checkpoint(tmp_path):
    # Saving every step keeps an asynchronous save in flight almost all the time.
    proc = train_process(tmp_path, "run", "train.max_steps=100000", "train.save_interval=1",
                         "train.eval_interval=100000", "train.keep=3")
    wait_for_step(tmp_path / "run", 8)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    complete = checkpoint_steps(tmp_path / "run")
    assert complete, "some checkpoint should have completed before the kill"
    resume = train_process(tmp_path, "run", f"train.max_steps={complete[-1] + 3}",
                           "train.resume=true", "train.save_interval=100000",
                           "train.eval_interval=100000")
    out, _ = resume.communicate(timeout=120)
    assert resume.returncode == 0, out
    assert f"resumed from {tmp_path / 'run' / 'checkpoints' / str(complete[-1])}" in out
    assert max(losses(tmp_path / "run")) == complete[-1] + 3
    # No half-written step folder is left that could pass for a checkpoint.
    assert all(p.name.isdigit() or "tmp" not in p.name
               for p in (tmp_path / "run" / "checkpoints").iterdir())


def test_corrupt_checkpoint_names_the_file_and_offers_the_previous_one(tmp_path, resume_config):
    Trainer(resume_config("run", "train.max_steps=4", "train.save_interval=2",
                          "train.keep=5")).run()
    assert checkpoint_steps(tmp_path / "run") == [2, 4]
    state_dir = tmp_path / "run" / "checkpoints" / "4" / "state"
    for file in state_dir.rglob("*"):
        if file.is_file() and file.stat().st_size > 0 and "manifest" not in file.name:
            file.write_bytes(file.read_bytes()[: file.stat().st_size // 3])
    before = sorted((p, p.stat().st_mtime_ns) for p in (tmp_path / "run").rglob("*"))
    with pytest.raises(CheckpointError, match=r"checkpoints/4 cannot be read.*train.resume_step=2"):
        Trainer(resume_config("run", "train.max_steps=6", "train.resume=true"))
    after = sorted((p, p.stat().st_mtime_ns) for p in (tmp_path / "run").rglob("*"))
    assert before == after, "a failed resume must not touch the run folder"
    resumed = Trainer(resume_config("run", "train.max_steps=6", "train.resume_step=2",
                                    "train.save_interval=2", "train.keep=5"))
    assert int(resumed.state.step) == 2
    # The damaged step 4 is set aside (kept), so the resumed run can save step 4 again.
    assert (tmp_path / "run" / "superseded_checkpoints" / "4" / "state").is_dir()
    assert resumed.run()["step"] == 6
    assert checkpoint_steps(tmp_path / "run") == [2, 4, 6]


def test_unwritable_out_dir_is_refused_before_training(tmp_path, resume_config):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ConfigError, match="is not writable"):
        Trainer(resume_config("file/run"))


def test_gpu_kernels_off_a_gpu_are_refused(resume_config):
    with pytest.raises(ConfigError, match="model.kernels=pallas compiles Triton kernels for NVIDIA "
                                          "GPUs, and this run's devices are cpu; use model.kernels=auto"):
        Trainer(resume_config("run", "model.kernels=pallas"))


def test_vocabulary_smaller_than_the_data_is_refused(resume_config):
    with pytest.raises(ConfigError, match=r"model.vocab_size=50 is smaller than the dataset's vocabulary \(65"):
        Trainer(resume_config("run", "model.vocab_size=50"))


def test_batch_not_divisible_across_devices_is_refused(tmp_path):
    code = (
        "import os; os.environ['XLA_FLAGS']='--xla_force_host_platform_device_count=4';"
        "import sys; sys.path.insert(0, 'tests');"
        "from jaxgpt2.errors import ConfigError;"
        "from jaxgpt2.trainer import Trainer;"
        "from runs import RESUME_OVERRIDES, tiny_config;"
        "from pathlib import Path;"
        f"p = Path({str(tmp_path)!r});"
        "\ntry:\n  Trainer(tiny_config(p, 'run', *RESUME_OVERRIDES, 'data.batch_size=6'))\n"
        "except ConfigError as e:\n  print('ERR', e)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert "ERR data.batch_size=6 cannot be split evenly across 4 devices" in out.stdout, out.stderr


def test_missing_data_folder_exits_non_zero_with_the_fix(tmp_path):
    result = subprocess.run(
        [sys.executable, "train.py", "--config", "configs/tiny.yaml",
         f"data.dataset={tmp_path / 'nowhere'}", f"train.out_dir={tmp_path / 'run'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "does not exist; make one with `python -m jaxgpt2.prepare" in result.stderr
    assert not (tmp_path / "run").exists()


def test_a_fresh_run_refuses_a_folder_holding_another_runs_checkpoints(tmp_path, resume_config):
    Trainer(resume_config("run", "train.max_steps=2", "train.save_interval=2")).run()
    before = sorted(p.name for p in (tmp_path / "run/checkpoints").iterdir())
    with pytest.raises(ConfigError, match=r"already holds checkpoints of a run \(steps 2\); "
                                          r"continue it with train.resume=true"):
        Trainer(resume_config("run", "train.max_steps=4", "train.save_interval=2"))
    assert sorted(p.name for p in (tmp_path / "run/checkpoints").iterdir()) == before


@pytest.mark.parametrize("prompt, problem", [("", "prompt is empty"),
                                             ("€", "not in this character vocabulary")])
def test_an_unusable_sample_prompt_is_refused_before_training(tmp_path, resume_config, prompt,
                                                               problem):
    with pytest.raises(ConfigError, match=f"train.sample_prompt=.*{problem}"):
        Trainer(resume_config("run", "train.sample_tokens=5",
                              f"train.sample_prompt={prompt}"))
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("override", ["train.resume=true", "train.resume_step=3"])
def test_resuming_a_folder_without_that_checkpoint_is_refused(tmp_path, resume_config, override):
    with pytest.raises(ConfigError, match="holds no checkpoints|has no checkpoint for that step"):
        Trainer(resume_config("typo", override))
    assert not (tmp_path / "typo").exists()


def test_resume_flag_with_a_mistyped_folder_exits_non_zero(tmp_path):
    result = subprocess.run(
        [sys.executable, "train.py", "--config", "configs/tiny.yaml", "--resume",
         str(tmp_path / "typo"), f"data.cache_dir={tmp_path / 'data'}", "train.progress=false"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "holds no checkpoints" in result.stderr and "Traceback" not in result.stderr


def test_a_missing_init_from_folder_is_a_config_error(tmp_path, resume_config):
    with pytest.raises(ConfigError, match=r"model.init_from=.*nowhere"):
        Trainer(resume_config("run", f"model.init_from={tmp_path / 'nowhere'}"))


def test_a_model_vocabulary_above_the_datas_samples_only_decodable_ids(resume_config):
    trainer = Trainer(resume_config("run", "model.vocab_size=128",
                                    "train.sample_tokens=200"))
    assert trainer.gpt_config.vocab_size == 128  # untrained: all 128 ids about equally likely
    assert len(trainer.sample()) == len(trainer.config.train.sample_prompt) + 200