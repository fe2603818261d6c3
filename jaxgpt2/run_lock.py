"""One run per folder: an exclusive OS lock on ``<out_dir>/run.lock`` for the whole run.

Two runs writing one ``out_dir`` replace each other's checkpoints and ``config.yaml``
and interleave ``metrics.jsonl``; the check for another run's checkpoints at start-up
cannot see a run that has not saved yet. The lock is ``flock``: the kernel releases it
when the process ends, however it ends, so a crash never leaves a stale lock. The file
names the holder (host, pid, start time) for the run that is turned away; it is written
once the run's set-up has succeeded (``record_holder``), so a run refused during set-up
(a damaged checkpoint, say) leaves the folder as it found it. On several hosts, process
0 holds it for the run.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path
from typing import IO

import jax

from jaxgpt2.errors import ConfigError

LOCK_NAME = "run.lock"


class RunLock:
    """Held from ``acquire`` until ``release`` (or until the object or process goes)."""

    def __init__(self, file: IO[str] | None) -> None:
        self._file = file

    @classmethod
    def acquire(cls, out_dir: Path) -> RunLock:
        """Lock ``out_dir`` for this run, or raise a ConfigError naming the holder."""
        if jax.process_index() != 0:
            return cls(None)
        out_dir.mkdir(parents=True, exist_ok=True)
        file = open(out_dir / LOCK_NAME, "a+")
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.seek(0)
            holder = file.read().strip() or "a run still setting up"
            file.close()
            raise ConfigError(f"{out_dir} is in use by another run ({holder}); wait for it to "
                              "finish, or choose another train.out_dir") from None
        return cls(file)

    def record_holder(self) -> None:
        """Write this process as the holder, for a run turned away to name."""
        if self._file is not None:
            self._file.seek(0)
            self._file.truncate()
            started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())
            self._file.write(f"host {socket.gethostname()}, pid {os.getpid()}, started "
                             f"{started}\n")
            self._file.flush()

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing the descriptor drops the lock
            self._file = None
