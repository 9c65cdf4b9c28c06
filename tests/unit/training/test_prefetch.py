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
        if i > 0:
            gate.wait(5)  # item 1 holds the one thread until after the close
        return i

    it = prefetched(iter(range(100)), work, depth=8, threads=1)
    assert next(it) == (0, 0)
    deadline = time.time() + 5
    while len(started) < 2 and time.time() < deadline:
        time.sleep(0.01)
    it.close()
    gate.set()
    time.sleep(0.2)
    assert started == [0, 1]  # the item running at the close finishes; no other starts, depth or not
    assert not [t for t in threading.enumerate() if t.name.startswith("prefetch")]  # its thread is gone


def test_an_error_of_the_items_themselves_surfaces_at_its_position():
    def planned():
        yield 0
        yield 1
        raise OSError("shard list unreadable")

    it = prefetched(planned(), lambda i: i, depth=4, threads=2)
    assert [next(it), next(it)] == [(0, 0), (1, 1)]
    with pytest.raises(OSError, match="unreadable"):
        next(it)


def test_an_empty_plan_and_more_threads_than_items_end_cleanly():
    assert list(prefetched(iter([]), lambda i: i, depth=4, threads=3)) == []
    assert list(prefetched(iter([7]), lambda i: i + 1, depth=4, threads=3)) == [(7, 8)]
    time.sleep(0.1)
    assert not [t for t in threading.enumerate() if t.name.startswith("prefetch")]
