"""Host allocator settings that keep XLA:CPU's per-step buffers in memory between steps.

XLA:CPU allocates each execution's temporaries as one block (`posix_memalign`; ~280 MB for the
13M-parameter benchmark model) and frees it after the step. glibc serves such a block from a fresh
`mmap` when the calling thread uses a secondary malloc arena (those are capped at 64 MB), so every step
page-faults the whole block in again: ~69k faults, ~25 % of a CPU train step here
(`experiments/bench_train_step`). With one arena, no `mmap` and a high trim threshold, the block is
reused from the heap. Process-wide and Linux/glibc only; a no-op elsewhere.

Applied when the `experiments` package is imported (`experiments/__init__.py`), i.e. before an entry
point imports numpy or JAX: a thread that already has its own arena (numpy's BLAS threads start on import)
keeps it, and glibc hands later threads, XLA's among them, round-robin to the existing arenas. This module
therefore imports nothing but the standard library.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8  # glibc <malloc.h>
ENV_SWITCH = "INTERNLM2_JAX_KEEP_HOST_MEMORY"
"""Set to `0` to leave glibc's allocator settings alone."""
APPLIED = False
"""Whether `keep_host_memory` has applied the settings in this process."""


def keep_host_memory(trim_threshold: int = 2**31 - 1) -> bool:
    """Sets glibc's malloc to one arena, no `mmap` and `trim_threshold` bytes kept on free.

    Call it before any thread exists (see the module docstring); importing `experiments` does.
    Freed memory stays with the process (RSS stays at the peak), which a training process reaches
    every step anyway. Returns True when the settings were applied.
    """
    global APPLIED
    if os.environ.get(ENV_SWITCH, "1") == "0" or not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):  # not glibc (e.g. musl has no mallopt)
        return False
    ok = all(mallopt(opt, val) == 1 for opt, val in (
        (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, trim_threshold)))
    if not ok:
        log.warning("mallopt rejected a setting; host allocator left partly at its defaults")
    APPLIED = APPLIED or ok
    return ok
