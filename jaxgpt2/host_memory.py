"""Keep freed host memory in the process, so XLA:CPU's per-step buffers are reused.

XLA:CPU mallocs a step's outputs and temporaries and frees them when it ends. glibc
serves blocks over 128 KiB with fresh ``mmap`` calls and hands freed memory at the top
of the heap back to the kernel, so every step faults its pages in again and the kernel
zeroes each one. On the 2-core machine the CPU recipe's step spent 9.5 of 28 s in the
kernel and took 49 ms; with freed memory kept it spends 1 s there and takes 37 ms
(``docs/performance.md``). GPU runs allocate little on the host, so the setting costs
them nothing.
"""

from __future__ import annotations

import ctypes

# glibc's mallopt parameters (malloc.h).
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
LARGEST_HEAP_BLOCK = 32 * 2**20  # glibc's ceiling for M_MMAP_THRESHOLD on 64-bit
KEEP_FREED = 2**30
TOP_PAD = 64 * 2**20


def keep_freed_memory() -> bool:
    """Serve blocks up to 32 MiB from the heap and keep up to 1 GiB of freed memory
    there; returns False where the C library has no ``mallopt`` (macOS) or refuses."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all(mallopt(param, value) == 1 for param, value in (
        (M_MMAP_THRESHOLD, LARGEST_HEAP_BLOCK), (M_TRIM_THRESHOLD, KEEP_FREED),
        (M_TOP_PAD, TOP_PAD)))
