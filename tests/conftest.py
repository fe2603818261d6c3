"""Shared fixtures. Tests run on the CPU in float32 so results are exact and repeatable."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

from jaxgpt2.config import GPTConfig  # noqa: E402
from jaxgpt2.model import GPT  # noqa: E402


@pytest.fixture(scope="session")
def small_config() -> GPTConfig:
    return GPTConfig(vocab_size=100, block_size=16, n_layer=2, n_head=2, n_embd=32)


@pytest.fixture(scope="session")
def small_model(small_config):
    model = GPT(small_config)
    return model, model.init_params(jax.random.PRNGKey(0))
