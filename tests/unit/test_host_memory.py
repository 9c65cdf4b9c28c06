"""Freed model memory goes back to the system."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import psutil, torch
    from components.host_memory import release_memory
    rss = lambda: psutil.Process().memory_info().rss
    block = torch.empty(8_000_000)
    del block  # a freed 32 MB block: glibc's mmap threshold follows it up, as after loading a model
    before = rss()
    tensors = [torch.ones(1_000_000) for _ in range(300)]  # 1.2 GB of 4 MB tensors, as a model's are
    held = rss() - before
    del tensors
    import gc; gc.collect()
    kept = rss() - before
    release_memory()
    print(held, kept, rss() - before)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_release_memory_returns_a_freed_model_to_the_system():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True).stdout
    held, kept, released = map(int, out.split())
    assert held > 1.1e9
    assert kept > 0.5 * held  # glibc keeps what was freed ...
    assert released < 0.1 * held  # ... until it is asked to give it back
