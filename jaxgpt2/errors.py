"""The errors a user can fix, and the one rule for reporting them.

Every ``UserError`` is phrased for the person at the command line: what is wrong and
what to do. ``train.py`` and every ``python -m jaxgpt2.*`` tool run their body through
``report_errors``: a ``UserError`` prints ``error: <message>`` on stderr and exits 1
without a traceback; anything else is a bug and keeps its traceback.

Each class also derives from the builtin its callers would expect (``ValueError`` for a
bad value, ``FileNotFoundError`` for a missing path), so library users can catch either.
"""

from __future__ import annotations

import sys
from typing import Callable


class UserError(Exception):
    """A problem in the user's input, configuration or files, not in jaxgpt2."""


class ConfigError(UserError, ValueError):
    """A configuration value that cannot work, named with its fix."""


class DataError(UserError, ValueError):
    """A dataset that cannot be trained on or scored, phrased with the fix."""


class InputError(UserError, ValueError):
    """A bad argument or input file of a tool: a prompt, a sampling setting, a corpus."""


class WeightsError(UserError, ValueError):
    """A Hugging Face GPT-2 folder that cannot be loaded (or params that cannot be saved)
    faithfully."""


class NotFoundError(UserError, FileNotFoundError):
    """A file or folder the user named does not exist or is not what was asked for."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be restored, phrased with what to do instead."""


class NonFiniteError(UserError, RuntimeError):
    """Too many consecutive steps with non-finite gradients; the state was saved."""


def report_errors(body: Callable[[], object]) -> int:
    """Run ``body``; return 0, or 1 after printing ``error: ...`` for a ``UserError``."""
    try:
        body()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0
