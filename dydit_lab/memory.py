"""Host memory: keep the buffers torch frees inside the process, so the next step reuses them.

With glibc's default settings, malloc hands large freed blocks back to the operating system
(``munmap`` above its mmap threshold, a heap trim at the top of the heap) and takes fresh ones for
the next forward, and every page of a fresh block costs a page fault and zeroing by the kernel.
A sampling loop frees and re-allocates the same activations every step, so on a CPU the faults
recur every step, most where large activations are freed and re-requested in changing sizes
(several paths interleaved, or blocks of different widths). :func:`keep_freed_memory` raises
both thresholds once per process; freed blocks then stay in the heap (the process keeps its peak
footprint) and are reused. ``python -m dydit_lab`` does this before every command.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

KEEP_UP_TO_BYTES = 1 << 30  # blocks below this come from the heap and stay there when freed
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
_kept = False


def keep_freed_memory(up_to_bytes: int = KEEP_UP_TO_BYTES) -> bool:
    """Make glibc's malloc keep freed blocks up to ``up_to_bytes`` for reuse instead of returning
    them to the OS (``mallopt`` of the mmap and trim thresholds). Returns whether it took
    effect: False off Linux or without glibc (e.g. musl, macOS), where nothing changes."""
    global _kept
    if not 0 < up_to_bytes < 2**31:
        raise ValueError(f"up_to_bytes must be in (0, 2**31), got {up_to_bytes}")
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _kept = bool(mallopt(_M_MMAP_THRESHOLD, up_to_bytes)) and bool(mallopt(_M_TRIM_THRESHOLD, up_to_bytes))
    return _kept


def freed_memory_kept() -> bool:
    """Whether :func:`keep_freed_memory` took effect in this process (a benchmark records it)."""
    return _kept


def minor_page_faults() -> int:
    """This process's minor page faults so far (``getrusage``): count them around a call to see
    how many fresh pages it touched (Unix only)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
