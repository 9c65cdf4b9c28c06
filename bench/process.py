"""How every benchmark process runs: glibc's malloc thresholds pinned, so that timings do not depend
on a process's allocation history."""

from __future__ import annotations

import os
import sys

from components.environment import snapshot

PINNED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}
"""glibc malloc settings, read at process start: step-sized buffers up to 32 MiB (glibc's largest
allowed threshold) come from the heap, freed memory is kept up to 1 GiB, and the dynamic threshold is
off, so a process's allocation cost no longer depends on its history: the same step takes the same
time in every process. The benchmarks run every process with them (``flows/bench.py``; the figures with
and without them: docs/benchmarks.md)."""


def pin_malloc() -> None:
    """Run this process again with ``PINNED_MALLOC`` (glibc reads it at start), so the driver, the
    local Ray cluster it starts and every subprocess share one allocator behaviour. The command line is the
    interpreter's own (``sys.orig_argv``), so a process started as ``python -m MODULE`` restarts as one."""
    if any(os.environ.get(k) != v for k, v in PINNED_MALLOC.items()):
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], {**snapshot(), **PINNED_MALLOC})
