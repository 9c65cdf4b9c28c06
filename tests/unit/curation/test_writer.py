"""The publish protocol without Ray: _SUCCESS last, a crash never looks complete, a rerun replaces
the dataset cleanly, val/train are non-empty, and the digest names the data, not its sharding."""

from __future__ import annotations

import hashlib
import json

import pyarrow.parquet as pq
import pytest

from components import dataset
from components.curation.dedupe import find_duplicates, remove_duplicates
from components.curation.filters import Reason
from components.curation.process import Outcome, split_of
from components.curation.writer import aggregate, begin, outcomes_table, publish, write_shard
from components.storage import Store

HOLDOUT = 0.1


def kept(i: int, sha: str | None = None, caption: str = "c") -> Outcome:
    sha = sha or hashlib.sha256(f"img{i}".encode()).hexdigest()
    row = {"image": f"jpeg{i}".encode(), "caption": caption, "original_h": 300, "original_w": 400, "crop_top": 0,
           "crop_left": i, "target_h": 192, "target_w": 320, "bucket": "320x192", "source": f"/in/{i}.jpg",
           "sha256": sha}
    return Outcome(f"/in/{i}.jpg", None, "", row)


def train_sha(i: int) -> str:  # a hash in the train part of the space
    return "f" + hashlib.sha256(f"t{i}".encode()).hexdigest()[1:]


def run(store, root, run_id, groups, holdout=HOLDOUT):
    """Write each group of outcomes as one shard (one Ray write task each), then publish."""
    begin(store, root)
    results = [write_shard(store, root, f"{run_id}-{n:05d}", outcomes_table(g, holdout)) for n, g in enumerate(groups)]
    agg = aggregate(results)
    return publish(store, root, run_id, agg, holdout, {"inputs": agg["inputs"]})


def test_publish_then_crash_then_rerun(tmp_path):
    store, root = Store(), str(tmp_path / "ds")
    dropped = Outcome("/in/bad.jpg", Reason.CORRUPT, "broken data stream")
    report = run(store, root, "r1", [[kept(i) for i in range(4)] + [dropped], [kept(i) for i in range(4, 8)]])
    m = dataset.read_manifest(root)
    assert m.digest == report["digest"] and sum(m.rows.values()) == 8
    assert pq.read_table(m.paths("train") + m.paths("val")).schema.equals(dataset.SCHEMA)
    success = json.loads((tmp_path / "ds" / dataset.SUCCESS).read_text())
    assert success["rejects"] and pq.read_table(str(tmp_path / "ds" / success["rejects"][0])).num_rows == 1

    # A second run crashes after writing one shard: the dataset must not look complete.
    begin(store, root)
    write_shard(store, root, "r2-00000", outcomes_table([kept(9)], HOLDOUT))
    with pytest.raises(dataset.IncompleteDatasetError):
        dataset.read_manifest(root)

    # Rerunning finishes cleanly: only the new run's shards remain, no temporary files.
    run(store, root, "r3", [[kept(i) for i in range(10, 16)]])
    m = dataset.read_manifest(root)
    listed = {p for s in dataset.SPLITS for p in m.files[s]}
    on_disk = {p.relative_to(tmp_path / "ds").as_posix() for p in (tmp_path / "ds").rglob("*")
               if p.is_file() and p.suffix == ".parquet" and "rejects" not in p.parts}
    assert on_disk == listed and all("r3" in p for p in listed)
    assert not list((tmp_path / "ds").rglob(".tmp-*"))
    assert sum(m.rows.values()) == 6


def test_small_dataset_gets_a_val_row_and_train_is_never_empty(tmp_path):
    store = Store()
    outcomes = [kept(i, train_sha(i)) for i in range(5)]
    assert all(split_of(o.row["sha256"], HOLDOUT) == "train" for o in outcomes)
    report = run(store, str(tmp_path / "a"), "r", [outcomes[:3], outcomes[3:]])
    assert report["splits"] == {"train": 4, "val": 1}
    val = pq.read_table(dataset.read_manifest(str(tmp_path / "a")).paths("val")).to_pylist()
    assert val[0]["sha256"] == min(o.row["sha256"] for o in outcomes)  # the one nearest the val side

    assert run(store, str(tmp_path / "b"), "r", [outcomes[:4]])["splits"] == {"train": 4, "val": 0}  # < 5 kept
    assert run(store, str(tmp_path / "c"), "r", [outcomes], holdout=0.0)["splits"] == {"train": 5, "val": 0}
    only_val = [kept(0, "0" * 64)]
    assert run(store, str(tmp_path / "d"), "r", [only_val])["splits"] == {"train": 1, "val": 0}
    assert run(store, str(tmp_path / "e"), "r", [[Outcome("/x", Reason.EMPTY)]])["splits"] == {"train": 0, "val": 0}


def test_digest_is_independent_of_sharding_and_sensitive_to_content(tmp_path):
    store = Store()
    rows = [kept(i) for i in range(12)]
    one = run(store, str(tmp_path / "a"), "r", [rows])["digest"]
    three = run(store, str(tmp_path / "b"), "q", [rows[8:], rows[:3], rows[3:8]])["digest"]
    assert one == three
    changed = rows[:-1] + [kept(11, caption="another caption")]
    assert run(store, str(tmp_path / "c"), "r", [changed])["digest"] != one


def dup(i: int, source: str, sha: str) -> Outcome:
    """Row ``i``'s pixels and crop, from ``source``, with content hash ``sha``."""
    o = kept(i, sha)
    o.row["source"] = o.source = source
    return o


def dedupe_run(store, root, run_id, groups):
    begin(store, root)
    results = [write_shard(store, root, f"{run_id}-{n:05d}", outcomes_table(g, HOLDOUT)) for n, g in enumerate(groups)]
    agg = remove_duplicates(store, root, run_id, aggregate(results))
    return agg, publish(store, root, run_id, agg, HOLDOUT, {"inputs": agg["inputs"]})


def test_duplicates_keep_the_smallest_source_whatever_the_sharding(tmp_path):
    """Byte-identical images across shards (and one listed twice): one row stays, the one with the
    smallest source URI; every other copy is a ``duplicate`` reject naming it; shard layout and
    order do not change the dataset's digest."""
    a, b = train_sha(1), train_sha(2)
    rows = [dup(0, "/in/z.jpg", a), dup(1, "/in/b.jpg", a), kept(2), dup(3, "/in/m.jpg", b),
            dup(4, "/in/a.jpg", a), dup(3, "/in/m.jpg", b), kept(6)]  # m listed twice: the same row
    digests = set()
    for n, groups in enumerate([[rows[:3], rows[3:]], [rows[::-1]], [[r] for r in rows[2:]] + [rows[:2]]]):
        store, root = Store(), str(tmp_path / f"ds{n}")
        agg, report = dedupe_run(store, root, f"r{n}", groups)
        digests.add(report["digest"])
        m = dataset.read_manifest(root)
        table = pq.read_table(m.paths("train") + m.paths("val"))
        assert sorted(table["source"].to_pylist()) == ["/in/2.jpg", "/in/6.jpg", "/in/a.jpg", "/in/m.jpg"]
        assert agg["reasons"] == {str(Reason.DUPLICATE): 3} and agg["inputs"] == len(rows)
        assert sum(f["rows"] for f in agg["files"]) == 4 == sum(m.rows.values())
        success = json.loads((tmp_path / f"ds{n}" / dataset.SUCCESS).read_text())
        rejects = pq.read_table([f"{root}/{p}" for p in success["rejects"]])
        got = sorted((r["source"], r["detail"].rsplit(" ", 1)[-1]) for r in rejects.to_pylist())
        assert got == [("/in/b.jpg", "/in/a.jpg"), ("/in/m.jpg", "/in/m.jpg"), ("/in/z.jpg", "/in/a.jpg")]
        assert set(rejects["reason"].to_pylist()) == {str(Reason.DUPLICATE)}
        listed = {p for s in dataset.SPLITS for p in m.files[s]}
        on_disk = {str(p.relative_to(root)) for s in dataset.SPLITS for p in (tmp_path / f"ds{n}" / s).glob("*")}
        assert on_disk == listed  # the shards that lost rows were replaced, not left beside their copies
    assert len(digests) == 1


def test_no_duplicates_leaves_the_shards_alone(tmp_path):
    store, root = Store(), str(tmp_path / "ds")
    results = [write_shard(store, root, "r-00000", outcomes_table([kept(i) for i in range(4)], HOLDOUT))]
    agg = aggregate(results)
    assert find_duplicates(agg["files"]) == {} and remove_duplicates(store, root, "r", agg) is agg
