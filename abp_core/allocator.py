"""The C allocator while training on the CPU: keep freed memory in the process instead of handing it back.

Why: PyTorch allocates every CPU tensor with the C library's ``malloc``. glibc serves blocks above its mmap
threshold (128 KiB, adjusted up to 32 MiB at run time) with a fresh ``mmap`` and unmaps them on ``free``, and
it trims the heap's free top above a threshold. The next step's tensors then touch new pages: one page fault
(and 4 KiB zeroed by the kernel) per page. At the paper-like size of ``benchmarks/epoch.py`` SchNet's backward
allocates about three 60 MiB blocks per step: 31,000-75,000 page faults per forward + backward (its allocator
line), a number that depended on what else the step had allocated (the readout), so the same backbone code ran
at different speeds after different readouts. :func:`freed_memory_kept` turns both off for a block
(``mallopt``: no mmap, no trimming), so memory freed by one step is reused by the next without faults: 8-16 %
less CPU time per step there. The process keeps its heap meanwhile, and glibc reuses a freed block only after a
few more are freed (its per-thread cache of the small chunks beside them), so the peak grows: by 13-18 % there.
On exit from the block the previous behaviour is restored, as far as ``mallopt`` allows (see below), and the
free memory is returned (``malloc_trim``).

Only glibc (Linux) has these settings; elsewhere (macOS, Windows, musl) the block changes nothing.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import threading
from typing import Optional

# mallopt parameters (glibc's malloc.h) and glibc's documented defaults for 64-bit processes
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4
DEFAULT_TRIM_THRESHOLD = 128 * 1024
DEFAULT_MMAP_THRESHOLD = 128 * 1024
DEFAULT_MMAP_MAX = 65536
#: Trim threshold while freed memory is kept: the largest value ``mallopt`` takes (an ``int``).
KEEP_TRIM_THRESHOLD = 2 ** 31 - 1

_lock = threading.Lock()
_depth = 0  # nested blocks: only the outermost one changes and restores the settings


@functools.lru_cache(maxsize=None)
def glibc() -> Optional[ctypes.CDLL]:
    """The process's glibc with ``mallopt`` and ``malloc_trim`` typed, or ``None`` when the C library is not
    glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # glibc only
        libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    except (OSError, AttributeError):
        return None
    return libc


@contextlib.contextmanager
def freed_memory_kept(on: bool = True):
    """Keep memory freed inside the block for reuse by later allocations (glibc; elsewhere, or with
    ``on=False``, nothing changes).

    Inside, blocks of any size come from the heap (``M_MMAP_MAX = 0``) and the heap is never trimmed
    (``M_TRIM_THRESHOLD`` at its maximum). On exit the outermost block sets glibc's defaults again (128 KiB
    thresholds, 65,536 mappings; ``mallopt`` cannot read the previous values, and setting any of them ends
    glibc's run-time adjustment of the mmap threshold, so a process that had tuned them through
    ``GLIBC_TUNABLES`` gets the defaults back) and returns the free memory to the system (``malloc_trim(0)``).
    Nested blocks leave the settings to the outermost one. The settings are process-wide: every thread's
    allocations are affected while any block is open.
    """
    global _depth
    libc = glibc() if on else None
    if libc is None:
        yield
        return
    with _lock:
        _depth += 1
        if _depth == 1:
            libc.mallopt(M_MMAP_MAX, 0)
            libc.mallopt(M_TRIM_THRESHOLD, KEEP_TRIM_THRESHOLD)
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                libc.mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX)
                libc.mallopt(M_MMAP_THRESHOLD, DEFAULT_MMAP_THRESHOLD)
                libc.mallopt(M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD)
                libc.malloc_trim(0)


def kept() -> bool:
    """Is a :func:`freed_memory_kept` block open (and in effect) in this process?"""
    return _depth > 0
