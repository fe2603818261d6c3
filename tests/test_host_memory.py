"""Freed host memory stays in the process (``jaxgpt2.host_memory``), so a step's worth of
buffers allocated and freed again and again reuses its pages instead of faulting fresh
ones in each time (what XLA:CPU does every step)."""

import subprocess
import sys

import pytest

FAULTS_OF_REPEATED_STEPS = """
import resource, sys
import numpy as np
from jaxgpt2.host_memory import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):  # a "step": 24 buffers of 1-3 MiB, 48 MiB in all, then freed
    buffers = [np.ones(2**18 * (1 + i % 3), np.float32) for i in range(24)]
    del buffers
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
PAGES_PER_STEP = 48 * 2**20 // 4096


def _faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", FAULTS_OF_REPEATED_STEPS, mode],
                         capture_output=True, text=True, check=True)
    return int(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")
def test_a_repeated_steps_buffers_fault_their_pages_in_once_not_every_step():
    assert _faults("default") > 5 * PAGES_PER_STEP  # glibc hands the memory back each time
    assert _faults("keep") < 2 * PAGES_PER_STEP
