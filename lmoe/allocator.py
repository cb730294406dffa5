"""CPU runs keep freed memory for reuse instead of handing it back to the system after every step.

glibc serves a large request (gradients, activations, logits: megabytes each) with a fresh mapping
and unmaps it when freed, so the next step page-faults the same memory back and the kernel zeroes it
again. Told to keep what is freed (mallopt: no mapping below 1 GiB, no trim below 16 GiB), a step
reuses the last step's memory: the process holds its peak instead of returning to it each step
(bench/RESULTS.md has what it measured).

A process-wide setting, so the library never makes it by itself: `lmoe train` asks for it where
LMOE_KEEP_FREED_MEMORY=1 (run.sh sets it), and a script may call keep_freed_memory() itself.
"""

from __future__ import annotations

import ctypes
import ctypes.util

# glibc mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
KEPT = ((M_MMAP_THRESHOLD, 1 << 30), (M_TRIM_THRESHOLD, 1 << 34), (M_TOP_PAD, 1 << 30))


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed memory for reuse (process-wide); False where there is no
    glibc (macOS, musl, Windows: nothing changes)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return False
    if libc is None or not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):
        return False
    return all(libc.mallopt(param, value) == 1 for param, value in KEPT)
