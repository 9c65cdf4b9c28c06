"""Batches prepared ahead of the step: reading the planned rows, JPEG decoding and collation run in worker
threads while the model trains on the batch before.

The order is the plan's (``batches.epoch_plan``), item for item, so a resumed run still sees exactly the
batches it would have; only *when* the work happens changes. Pillow's decoder and Arrow's ``take`` release
the GIL for most of their time, and a batch is collated as uint8 in numpy (``components.dataset.collate_rgb``:
no torch op, so no intra-op thread pool woken from a loader thread), so the threads overlap with the step.

Why threads in the worker rather than a Ray Data ``map_batches`` before the split: the epoch plan fixes
which rows form each rank's k-th micro-batch (exact resume, the same number of batches per rank, the
mixture's draws), and Ray Data's streaming split hands rows to whichever rank asks first. The plan stays;
the wait goes.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

T = TypeVar("T")
U = TypeVar("U")


def prefetched(items: Iterator[T], work: Callable[[T], U], depth: int, threads: int = 2) -> Iterator[tuple[T, U]]:
    """``(item, work(item))`` for each item, in order, with up to ``depth`` items taken and worked on ahead of
    the consumer by ``threads`` threads. ``depth`` 0: each item's work runs when it is asked for, on the
    caller's thread.

    The threads schedule themselves: each takes the next item (under a lock: ``items`` need not be
    thread-safe) whenever fewer than ``depth`` are taken and not yet consumed. The consumer only picks up
    finished results and frees a slot. It never submits work itself: a thread woken from the consumer's call
    takes the interpreter lock there and then, and the consumer would wait out that whole batch's work
    (docs/benchmarks.md).

    An exception raised by ``work`` (or by ``items``) surfaces where its item is consumed. Closing the
    generator (a loop that stops early) lets the items being worked on finish, starts no other, and waits
    for none of them.
    """
    if depth <= 0:
        for item in items:
            yield item, work(item)
        return
    taking = threading.Lock()  # guards ``items`` and the count of items taken
    slots = threading.Semaphore(depth)  # items taken and not yet consumed
    done = threading.Condition()
    results: dict[int, tuple[bool, object]] = {}  # position -> (ok, (item, result) or the error)
    state = {"taken": 0, "end": None, "closed": False}

    def run() -> None:
        while True:
            slots.acquire()
            if state["closed"]:
                return
            with taking:
                if state["end"] is not None:
                    return
                k = state["taken"]
                try:
                    item = next(items, _END)
                except BaseException as err:  # the plan itself failed: surfaces at its position
                    item, out = _END, (False, err)
                else:
                    out = None
                if item is _END:
                    state["end"] = k + (out is not None)
                else:
                    state["taken"] = k + 1
            if item is not _END:
                try:
                    out = (True, (item, work(item)))
                except BaseException as err:
                    out = (False, err)
            with done:
                if out is not None:
                    results[k] = out
                done.notify_all()
            if item is _END:
                return

    workers = [threading.Thread(target=run, name=f"prefetch_{i}", daemon=True) for i in range(max(1, threads))]
    for w in workers:
        w.start()
    try:
        k = 0
        while True:
            with done:
                while k not in results and (state["end"] is None or k < state["end"]):
                    done.wait()
                if k not in results:
                    return
                ok, value = results.pop(k)
            slots.release()
            if not ok:
                raise value  # type: ignore[misc]
            yield value  # type: ignore[misc]
            k += 1
    finally:
        state["closed"] = True
        for _ in workers:  # one slot for each thread that may be waiting for one: it sees ``closed`` and exits
            slots.release()


_END = object()
