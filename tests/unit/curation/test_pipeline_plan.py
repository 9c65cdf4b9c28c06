"""How the curation stage is cut into Ray tasks: block sizes and how many tasks are submitted at once."""

from __future__ import annotations

from components.curation.pipeline import TASKS_PER_WORKER, block_size, tasks_in_flight


def test_blocks_give_about_tasks_per_worker_and_at_most_a_shard():
    assert block_size(256, 2, 64) == 256 // (2 * TASKS_PER_WORKER)
    assert block_size(10_000, 2, 64) == 64
    assert block_size(3, 8, 64) == 1


def test_tasks_queue_ahead_only_where_they_take_every_cpu_and_fuse():
    assert tasks_in_flight(2, 2.0, fused=True) == 4  # 2 run, 2 wait at Ray's scheduler
    assert tasks_in_flight(4, 2.0, fused=True) == 8  # more workers than CPUs: still at most 2 run
    assert tasks_in_flight(2, 8.0, fused=True) == 2  # spare CPUs: extra tasks would run, beyond curate.workers
    assert tasks_in_flight(2, 2.0, fused=False) == 2  # captioning actors or parquet reads between: unchanged
    assert tasks_in_flight(2, 0.0, fused=True) == 2
