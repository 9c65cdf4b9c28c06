"""The prefetcher keeps the plan's order, runs ahead by its depth, surfaces errors where they belong and
stops its threads when the loop stops early."""

from __future__ import annotations

import random
import threading
import time

import pytest

from components.training.prefetch import prefetched


def test_order_and_results_are_the_sequential_ones_whatever_the_timing():
    rng = random.Random(0)
    delays = [rng.uniform(0, 0.01) for _ in range(40)]

    def work(i: int) -> int:
        time.sleep(delays[i])  # later items often finish first
        return i * i

    assert list(prefetched(iter(range(40)), work, depth=6, threads=4)) == [(i, i * i) for i in range(40)]


def test_work_runs_ahead_of_the_consumer_by_the_depth():
    started: list[int] = []
    lock = threading.Lock()

    def work(i: int) -> int:
        with lock:
            started.append(i)
        return i

    it = prefetched(iter(range(20)), work, depth=3, threads=2)
    assert next(it) == (0, 0)
    deadline = time.time() + 5
    while len(started) < 4 and time.time() < deadline:  # item 0 and the three behind it
        time.sleep(0.01)
    assert sorted(started) == [0, 1, 2, 3]  # no further than the depth
    it.close()


def test_depth_zero_works_on_the_callers_thread():
    threads = set()
    out = list(prefetched(iter(range(3)), lambda i: threads.add(threading.current_thread()) or i, depth=0))
    assert out == [(0, 0), (1, 1), (2, 2)] and threads == {threading.current_thread()}


def test_an_error_surfaces_at_its_own_item():
    def work(i: int) -> int:
        if i == 2:
            raise ValueError("corrupt image in batch 2")
        return i

    it = prefetched(iter(range(5)), work, depth=4)
    assert [next(it), next(it)] == [(0, 0), (1, 1)]
    with pytest.raises(ValueError, match="batch 2"):
        next(it)


def test_closing_early_cancels_what_has_not_started():
    gate = threading.Event()
    started: list[int] = []

    def work(i: int) -> int:
        started.append(i)
        gate.wait(5)
        return i

    it = prefetched(iter(range(100)), work, depth=8, threads=1)
    gate.set()
    assert next(it) == (0, 0)
    gate.clear()  # the one thread now blocks on its next item
    it.close()
    gate.set()
    time.sleep(0.2)
    assert len(started) <= 3  # the item running at close, at most one more; never the rest of the depth
