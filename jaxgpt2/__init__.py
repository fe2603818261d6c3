"""jaxgpt2: GPT-2 training in JAX, Flax and Optax."""

from jaxgpt2.config import GPTConfig
from jaxgpt2.model import GPT

__all__ = ["GPT", "GPTConfig"]
