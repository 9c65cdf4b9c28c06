"""Giving freed host memory back to the operating system.

glibc's allocator serves allocations under its mmap threshold (which grows to 32 MB once a large block has
been freed) from heaps it keeps: freeing a model of such tensors (most of SDXL's are 1-30 MB) leaves the
process's resident size where it was. A process that builds or loads a model, drops it and goes on (the
training driver after registering a base, a Serve replica after a swap) would hold that memory for nothing,
beside the next process that needs it. ``release_memory`` collects garbage and then asks glibc to return its
free pages (``malloc_trim``); elsewhere (another C library, another system) it only collects.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import sys
from functools import cache


@cache
def _malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        return None


def release_memory() -> bool:
    """Collect garbage and return the allocator's free pages to the system; True when they were returned."""
    gc.collect()
    trim = _malloc_trim()
    return bool(trim is not None and trim(0))
