"""The epoch order and the mixture: every epoch a fresh order seeded by (seed, epoch), bucket batches still
pure, ranks equal, a resume that skips exactly what was consumed, and the mixture's draws per source. Pure functions on
a real curated split (shards written to the dataset contract), no Ray."""

from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow.parquet as pq
import pytest

import components.storage as storage
from components.config import load_config
from components.dataset import read_manifest
from components.training.batches import (
    ShardRows,
    draws,
    epoch_plan,
    read_index,
    source_counts,
)
from components.training.loop import EpochReader
from tests.fixtures.processes import REPO
from tests.synthetic import write_synthetic_curated

SIZES = [(64, 64), (64, 128), (128, 64)]


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    root = write_synthetic_curated(tmp_path_factory.mktemp("order") / "data", n_train=48, n_val=2, sizes=SIZES,
                                   sources={"laion": 1.0, "mj": 1.0}, shards=6)
    manifest = read_manifest(str(root))
    return manifest, read_index(manifest.paths("train"))


def _plan(index, epoch, world=1, mode="global", repeats=None, batch_size=2, seed=0, window=8):
    return epoch_plan(index, seed=seed, epoch=epoch, world=world, batch_size=batch_size,
                      repeats=repeats or {}, mode=mode, window=window)


@pytest.mark.parametrize("mode", ["global", "blocks"])
def test_two_epochs_read_the_same_rows_in_different_orders(split, mode):
    """Each bucket's 16 rows make 8 whole batches of 2: an epoch reads every row once. Epoch 0 and epoch 1
    read the same rows in another order; the same (seed, epoch) gives the same order (what resume needs)."""
    _, index = split
    e0, e1 = _plan(index, 0, mode=mode)[0], _plan(index, 1, mode=mode)[0]
    flat0, flat1 = np.concatenate(e0), np.concatenate(e1)
    assert sorted(flat0.tolist()) == sorted(flat1.tolist()) == list(range(len(index)))
    assert flat0.tolist() != flat1.tolist()
    assert [b.tolist() for b in _plan(index, 1, mode=mode)[0]] == [b.tolist() for b in e1]  # reproducible
    assert [b.tolist() for b in _plan(index, 1, mode=mode, seed=1)[0]] != [b.tolist() for b in e1]
    for batch in e0 + e1:  # bucket-pure
        assert len({index.bucket[i] for i in batch}) == 1


@pytest.mark.parametrize("mode", ["global", "blocks"])
def test_ranks_get_as_many_batches_each_and_never_the_same_row(split, mode):
    _, index = split
    plans = _plan(index, 3, world=3, mode=mode)
    assert len({len(p) for p in plans}) == 1 and len(plans[0]) > 0
    rows = [i for p in plans for b in p for i in b.tolist()]
    assert len(rows) == len(set(rows))  # one epoch, repeats 1: no row on two ranks


def test_blocks_order_permutes_the_shards_per_epoch_and_keeps_a_rank_to_its_shards(split):
    _, index = split
    orders = []
    for epoch in (0, 1):
        plans = _plan(index, epoch, world=2, mode="blocks", window=4)
        for rank, plan in enumerate(plans):
            shards = {int(index.file_of[i]) for b in plan for i in b}
            other = {int(index.file_of[i]) for b in plans[1 - rank] for i in b}
            assert not shards & other  # each shard is read by one rank in an epoch
        orders.append([int(index.file_of[b[0]]) for b in plans[0]])
    assert orders[0] != orders[1]


@pytest.mark.parametrize("mode", ["global", "blocks"])
def test_a_resume_reads_exactly_the_batches_the_uninterrupted_epoch_had_left(split, mode):
    """The reader a restarted worker builds, asked for epoch 2 from micro-batch 5, gives the uninterrupted
    epoch's batches 5.. exactly (the same rows, in the same order), without the first five."""
    manifest, index = split
    cfg = load_config(REPO / "flows/configs/tiny.yaml", ["train.batch_size=2", "train.shuffle_window=8"])
    data = {"index": index, "mixture": {"repeats": {"laion": 1.0, "mj": 1.0}}, "mode": "blocks"}
    whole = EpochReader(data, cfg)
    whole.mode = mode
    uninterrupted = [[r["sha256"] for r in rows] for rows in whole.batches(2, 0, 1, 0)]
    restarted = EpochReader(data, cfg)
    restarted.mode = mode
    resumed = [[r["sha256"] for r in rows] for rows in restarted.batches(2, 0, 1, 5)]
    assert resumed == uninterrupted[5:] and len(uninterrupted) == len(index) // 2
    assert len({h for b in uninterrupted for h in b}) == len(index)


def test_repeats_decide_how_often_each_source_is_drawn(split):
    """laion x2 and mj x0.5: every laion row twice, a fresh half of mj's rows each epoch."""
    _, index = split
    per_source = Counter(index.sources[c] for c in index.source)
    chosen = [draws(index, {"laion": 2.0, "mj": 0.5}, np.random.default_rng([0, e])) for e in (0, 1)]
    for c in chosen:
        counts = Counter(index.sources[index.source[i]] for i in c)
        assert counts == {"laion": 2 * per_source["laion"], "mj": per_source["mj"] // 2}
    mj = [set(c[index.source[c] == index.sources.index("mj")].tolist()) for c in chosen]
    assert mj[0] != mj[1]  # another half next epoch
    plan = _plan(index, 0, repeats={"laion": 2.0, "mj": 0.5})[0]
    counts = source_counts(index, plan)
    assert counts["laion"] > 3 * counts["mj"]  # 48 vs 12 drawn, less the bucket leftovers
    assert _plan(index, 0, repeats={"laion": 1.0, "mj": 0.0})[0] and \
        source_counts(index, _plan(index, 0, repeats={"laion": 1.0, "mj": 0.0})[0])["mj"] == 0


def test_streamed_rows_are_the_rows_the_plan_names(split):
    manifest, index = split
    rows = ShardRows(index, None, keep=2)
    ids = np.array([0, len(index) - 1, 7, 8, 0])
    taken = rows.take(ids)
    table = pq.read_table(manifest.paths("train"))
    assert [r["sha256"] for r in taken] == [table["sha256"][int(i)].as_py() for i in ids]


def test_threads_taking_at_once_read_each_shard_once_and_get_the_plans_rows(split, monkeypatch):
    """The prefetch threads share one ``ShardRows``: concurrent takes return exactly the serial rows, and a
    shard two threads want at the same moment is read once."""
    manifest, index = split
    reads: Counter = Counter()
    real = storage.read_parquet

    def counted(path, *args, **kwargs):
        reads[path] += 1
        return real(path, *args, **kwargs)

    monkeypatch.setattr(storage, "read_parquet", counted)
    plan = _plan(index, 0, mode="blocks")[0]
    serial = [[r["sha256"] for r in ShardRows(index, None, keep=len(index.files)).take(ids)] for ids in plan]
    reads.clear()
    rows = ShardRows(index, None, keep=len(index.files))
    with ThreadPoolExecutor(4) as pool:
        threaded = list(pool.map(lambda ids: [r["sha256"] for r in rows.take(ids)], plan))
    assert threaded == serial
    assert set(reads.values()) == {1} and len(reads) == len({index.files[int(f)] for f in index.file_of})
