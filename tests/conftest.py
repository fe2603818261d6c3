"""Shared fixtures. Tests run on the CPU in float32 so results are exact and repeatable."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Every Trainer jits fresh closures, so the same small programs would compile again in
# test after test (and in the CLI tests' subprocesses, which inherit this): one
# persistent compilation cache for the session compiles each program once.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="jaxgpt2_test_cache_")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ.update(JAX_COMPILATION_CACHE_DIR=_cache,
                      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")

import jax  # noqa: E402
import pytest  # noqa: E402

from jaxgpt2.config import GPTConfig  # noqa: E402
from jaxgpt2.model import GPT  # noqa: E402
from runs import RESUME_OVERRIDES, ROOT, tiny_config  # noqa: E402, F401  (ROOT: the repo)


@pytest.fixture(scope="session")
def small_config() -> GPTConfig:
    return GPTConfig(vocab_size=100, block_size=16, n_layer=2, n_head=2, n_embd=32)


@pytest.fixture(scope="session")
def small_model(small_config):
    model = GPT(small_config)
    return model, model.init_params(jax.random.PRNGKey(0))


@pytest.fixture
def run_config(tmp_path):
    """``make(run="run", *overrides)``: configs/tiny.yaml for a run in ``tmp_path/run``,
    data cached in ``tmp_path/data``, no progress bar, then ``overrides``."""
    def make(run: str = "run", *overrides: str):
        return tiny_config(tmp_path, run, *overrides)
    return make


@pytest.fixture
def resume_config(run_config):
    """``run_config`` with ``runs.RESUME_OVERRIDES`` before the test's own overrides:
    what the checkpoint, resume and failure tests train with."""
    def make(run: str = "run", *overrides: str):
        return run_config(run, *RESUME_OVERRIDES, *overrides)
    return make
