"""Process-level tuning that the entry points (CLI, Ray workers, benchmarks) apply once.

``tune_allocator()``: glibc's malloc serves every allocation above its mmap threshold (128 KiB at
start, raised dynamically up to 32 MiB) with a fresh ``mmap`` and returns it on ``free``; the next
allocation of the same size then faults in and zeroes new pages. A CPU forward/backward pass
allocates and frees tens of activation tensors of 1-15 MB per batch, so a process spends a
noticeable share of its time in page faults until the dynamic threshold has caught up, which it
does only partly. Fixing the thresholds (mmap above 64 MiB, trim above 256 MiB) keeps those
buffers in the heap for reuse (``benchmarks/bench_malloc.py`` measures it). PyTorch's CPU tuning
guide gives the same advice (or jemalloc / tcmalloc via LD_PRELOAD). It is a process-wide setting,
so the library never applies it on import: the ``backdoorlab`` command, the Ray workers and the
benchmarks call this; a Python user may call it too. A no-op off glibc, or with
``BACKDOORLAB_TUNE_MALLOC=0``.

Measurements: docs/pairwise-audit.md.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_done: list[bool] = []


def tune_allocator(mmap_threshold: int = 64 << 20, trim_threshold: int = 256 << 20) -> bool:
    """Fix glibc malloc's mmap and trim thresholds (bytes) for this process; True when applied.
    Idempotent; a no-op (False) off Linux/glibc or when ``BACKDOORLAB_TUNE_MALLOC=0``."""
    if _done:
        return _done[0]
    ok = False
    if sys.platform.startswith("linux") and os.environ.get("BACKDOORLAB_TUNE_MALLOC", "1") != "0":
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            mallopt = libc.mallopt
            mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
            ok = bool(mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold))) and bool(mallopt(_M_TRIM_THRESHOLD, int(trim_threshold)))
        except (OSError, AttributeError):  # not glibc (musl has no mallopt)
            ok = False
    log.debug("malloc thresholds %s", "fixed" if ok else "left alone")
    _done.append(ok)
    return ok
