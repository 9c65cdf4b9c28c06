"""Mixture weights as sampling probabilities: an epoch's share per source is its weight, whatever the sources'
sizes; the draws are seeded by (seed, epoch), so a resumed run replans the same epoch; a source sets repeats or
weight, not both. Pure functions on an in-memory index, no Ray, no files."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from components.config import ConfigError, RecurringError, load_config
from components.dataset import CuratedManifest
from components.training.batches import epoch_plan, epoch_shares, shares, source_counts, weighted_draws
from components.training.driver import epoch_rows, mixture
from components.training.row_index import RowIndex


def _index(sizes: dict[str, int], buckets: int = 3, shards: int = 20, seed: int = 0) -> RowIndex:
    """Rows of each source in turn, each row in a random bucket, spread over ``shards`` shards."""
    rng = np.random.default_rng(seed)
    n = sum(sizes.values())
    source = np.concatenate([np.full(k, code) for code, k in enumerate(sizes.values())]).astype(np.int32)
    file_of = (np.arange(n) * shards // n).astype(np.int32)
    row_in_file = (np.arange(n) - np.searchsorted(file_of, file_of)).astype(np.int32)
    return RowIndex(files=tuple(f"s{i}.parquet" for i in range(shards)), file_of=file_of, row_in_file=row_in_file,
                    bucket=rng.integers(0, buckets, n).astype(np.int32), source=source,
                    buckets=tuple(f"b{i}" for i in range(buckets)), sources=tuple(sizes))


BIG = _index({"laion": 9000, "mj": 1000})
WEIGHTS = {"laion": 0.75, "mj": 0.25}


def _plan(index=BIG, epoch=0, **kw):
    args = dict(seed=0, epoch=epoch, world=2, batch_size=8, weights=WEIGHTS, mode="global") | kw
    return epoch_plan(index, **args)


@pytest.mark.parametrize("mode", ["global", "blocks"])
@pytest.mark.parametrize("replace", [False, True])
def test_weights_realise_their_share_whatever_the_sizes(mode, replace):
    """9,000 and 1,000 rows at weight 0.75 / 0.25: each epoch's planned batches are 0.75 laion to within 0.01
    (by repeats the same sources give 0.9). Without replacement the 2,500 mj draws take every mj row twice and
    a fresh 500 of them a third time."""
    for epoch in (0, 1):
        plan = _plan(epoch=epoch, mode=mode, replace=replace, window=256)
        got = epoch_shares(BIG, [ids for p in plan for ids in p])
        assert got["laion"] == pytest.approx(0.75, abs=0.01), (epoch, got)
        assert sum(len(b) for p in plan for b in p) > 0.99 * len(BIG) - 2 * 8 * 3  # leftovers: < a batch per bucket
    by_repeats = _plan(weights=None, repeats={})
    assert epoch_shares(BIG, [ids for p in by_repeats for ids in p])["laion"] == pytest.approx(0.9, abs=0.01)
    drawn = Counter(weighted_draws(BIG, WEIGHTS, np.random.default_rng(0)).tolist())
    mj = [drawn[i] for i in np.flatnonzero(BIG.source == 1)]
    assert Counter(mj) == {2: 500, 3: 500}
    assert sum(drawn.values()) == len(BIG)


def test_epoch_samples_sets_the_epoch_length_and_shares_sum_exactly():
    """``samples`` rows an epoch, split by largest remainder: the per-source counts sum to it exactly."""
    assert shares(10, np.array([1.0, 1.0, 1.0])).tolist() == [4, 3, 3]
    assert shares(7, np.array([0.75, 0.25])).tolist() == [5, 2]
    chosen = weighted_draws(BIG, WEIGHTS, np.random.default_rng(1), samples=4000)
    counts = Counter(BIG.source[chosen].tolist())
    assert counts == {0: 3000, 1: 1000} and len(set(chosen[BIG.source[chosen] == 1].tolist())) == 1000
    with_replacement = weighted_draws(BIG, WEIGHTS, np.random.default_rng(1), samples=4000, replace=True)
    assert Counter(BIG.source[with_replacement].tolist()) == {0: 3000, 1: 1000}
    assert len(set(with_replacement[BIG.source[with_replacement] == 1].tolist())) < 1000  # repeats among draws
    zero = weighted_draws(BIG, {"laion": 1.0, "mj": 0.0}, np.random.default_rng(1))
    assert set(BIG.source[zero].tolist()) == {0}


def test_weighted_plans_are_deterministic_and_fresh_per_epoch():
    """Same (seed, epoch): the same batches, on every rank (what a resumed worker replans); another epoch or
    seed: other draws and order. Batches stay bucket-pure and the ranks even."""
    for mode in ("global", "blocks"):
        a, b = _plan(epoch=3, mode=mode), _plan(epoch=3, mode=mode)
        assert [[x.tolist() for x in p] for p in a] == [[x.tolist() for x in p] for p in b]
        assert len(a[0]) == len(a[1]) > 0
        assert all(len(set(BIG.bucket[ids].tolist())) == 1 for p in a for ids in p)
        other = _plan(epoch=4, mode=mode)
        assert [x.tolist() for x in other[0]] != [x.tolist() for x in a[0]]
        assert [x.tolist() for x in _plan(epoch=3, seed=1, mode=mode)[0]] != [x.tolist() for x in a[0]]
    e0 = weighted_draws(BIG, WEIGHTS, np.random.default_rng([0, 0]))
    e1 = weighted_draws(BIG, WEIGHTS, np.random.default_rng([0, 1]))
    third = lambda c: {i for i, k in Counter(c.tolist()).items() if k == 3}  # noqa: E731 - mj rows drawn 3 times
    assert third(e0) != third(e1)


def test_a_resume_replans_the_epoch_and_skips_what_was_consumed():
    """A restarted worker plans the epoch afresh (another process: no state carried) and takes its batches
    from the position it had reached: together with the consumed ones they are the uninterrupted epoch, and the
    realised mix of the resumed epoch is the planned one."""
    whole = _plan(epoch=2, world=1)[0]
    consumed = whole[:37]
    resumed = _plan(epoch=2, world=1)[0][37:]
    assert [x.tolist() for x in consumed + resumed] == [x.tolist() for x in whole]
    assert source_counts(BIG, consumed + resumed) == source_counts(BIG, whole)


def test_mixture_arguments_are_checked():
    with pytest.raises(ValueError, match="exactly one"):
        epoch_plan(BIG, seed=0, epoch=0, world=1, batch_size=8, repeats={"laion": 1.0}, weights=WEIGHTS)
    with pytest.raises(ValueError, match=r"no weight for source\(s\) \['mj'\]"):
        weighted_draws(BIG, {"laion": 1.0}, np.random.default_rng(0))
    with pytest.raises(ValueError, match="sum above 0"):
        weighted_draws(BIG, {"laion": 0.0, "mj": 0.0}, np.random.default_rng(0))


def _load(tmp_path, laion: str, mj: str, *overrides: str):
    path = tmp_path / "mix.yaml"
    path.write_text("curate:\n  sources:\n"
                    f"    - {{name: laion, kind: files, location: data/a, {laion}}}\n"
                    f"    - {{name: mj, kind: files, location: data/b, {mj}}}\n")
    return load_config(path, list(overrides))


def test_a_source_sets_repeats_or_weight_and_a_weighted_curation_weights_every_source(tmp_path):
    cfg = _load(tmp_path, "weight: 0.75", "weight: 0.25")
    assert [s.weight for s in cfg.curate.sources] == [0.75, 0.25]
    assert cfg.train.epoch_samples is None and cfg.train.mixture_replacement is False
    for laion, mj, match in [("weight: 0.75, repeats: 2", "weight: 0.25", "sets both repeats and weight"),
                             ("weight: 0.75", "repeats: 1", r"\['laion'\] set a weight and \['mj'\] do not"),
                             ("weight: 0", "weight: 0", "the weights sum to 0"),
                             ("weight: -1", "weight: 1", "greater than or equal to 0")]:
        with pytest.raises(ConfigError, match=match) as err:
            _load(tmp_path, laion, mj)
        assert "\n" not in str(err.value), str(err.value)
    with pytest.raises(ConfigError, match="epoch_samples"):
        _load(tmp_path, "weight: 1", "weight: 1", "train.epoch_samples=0")


def _manifest(**sources) -> CuratedManifest:
    return CuratedManifest(root="/data/mix", digest="d", files={}, rows={}, sources=sources)


def test_training_takes_the_curated_weights_and_train_mixture_overrides_them_in_kind(tmp_path):
    """What curation recorded in ``_SUCCESS`` decides the kind; ``train.mixture`` overrides by name in it."""
    cfg = _load(tmp_path, "weight: 1", "weight: 1", "train.mixture={mj: 0.5}", "train.epoch_samples=4000",
                "train.mixture_replacement=true")
    mix = mixture(cfg, _manifest(laion={"repeats": 1.0, "weight": 0.75}, mj={"repeats": 1.0, "weight": 0.25}), BIG)
    assert mix == {"weights": {"laion": 0.75, "mj": 0.5}, "samples": 4000, "replace": True}
    assert epoch_rows(mix, BIG) == 4000
    plain = _load(tmp_path, "repeats: 1", "repeats: 2")
    by_repeats = mixture(plain, _manifest(laion={"repeats": 1.0}, mj={"repeats": 2.0}), BIG)
    assert by_repeats == {"repeats": {"laion": 1.0, "mj": 2.0}} and epoch_rows(by_repeats, BIG) == 11000
    with pytest.raises(RecurringError, match="train.epoch_samples is for a weighted mixture"):
        mixture(cfg, _manifest(laion={"repeats": 1.0}, mj={"repeats": 1.0}), BIG)
    with pytest.raises(RecurringError, match=r"\['gone'\] have a weight but no train rows"):
        mixture(plain, _manifest(laion={"weight": 1.0}, mj={"weight": 1.0}, gone={"weight": 1.0}), BIG)
