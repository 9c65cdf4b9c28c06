"""Batches prepared ahead of the step: reading the planned rows, JPEG decoding and collation run in worker
threads while the model trains on the batch before.

The order is the plan's (``batches.epoch_plan``), item for item, so a resumed run still sees exactly the
batches it would have; only *when* the work happens changes. Pillow's decoder and resampling, Arrow's
``take`` and torch's ``stack`` release the GIL, so the threads overlap with the step's own compute.

Why threads in the worker rather than a Ray Data ``map_batches`` before the split: the epoch plan fixes
which rows form each rank's k-th micro-batch (exact resume, the same number of batches per rank, the
mixture's draws), and Ray Data's streaming split hands rows to whichever rank asks first. The plan stays;
the wait goes.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
U = TypeVar("U")


def prefetched(items: Iterator[T], work: Callable[[T], U], depth: int, threads: int = 2) -> Iterator[tuple[T, U]]:
    """``(item, work(item))`` for each item, in order, with up to ``depth`` items' work running ahead in
    ``threads`` threads. ``depth`` 0: each item's work runs when it is asked for, on the caller's thread.

    An exception raised by ``work`` surfaces where its item is consumed. Closing the generator (a loop that
    stops early) cancels the work not yet started and waits for none of it.
    """
    if depth <= 0:
        for item in items:
            yield item, work(item)
        return
    pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="prefetch")
    pending: deque[tuple[T, Future]] = deque()
    source = iter(items)

    def fill() -> None:
        # The items themselves (planned row ids -> rows) are taken here, in order, on the caller's thread:
        # their iterator need not be thread-safe.
        while len(pending) < depth:
            item = next(source, _END)
            if item is _END:
                return
            pending.append((item, pool.submit(work, item)))

    try:
        fill()
        while pending:
            item, future = pending.popleft()
            result = future.result()
            fill()
            yield item, result
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


_END = object()
