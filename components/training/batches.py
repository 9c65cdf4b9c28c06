"""From curated rows to training batches: the epoch's order, bucket-pure batches, resume at a position.

Batches never mix buckets (their images differ in size). Each epoch draws rows in a fresh order seeded
by (seed, epoch), and the whole epoch is planned up front as lists of row ids (``epoch_plan``), before
any row is read: the plan is a pure function of the train split's index (each row's bucket and source),
the seed, the epoch and the mixture, so every rank computes the same plan, ranks get the same number of
batches, and a resumed run skips exactly the micro-batches it had consumed (it never re-reads them).
docs/shuffle.md has the why.

Two orders, by how the rows are held (``train.in_memory_mb``):

- ``global``: the split is in memory (Ray's object store); the epoch's draws are permuted as a whole,
  grouped into bucket batches in order of completion, and dealt to the ranks in turn.
- ``blocks``: the split streams from its shards; the epoch permutes the shards, deals them to the
  ranks so that each draws about as many rows (``deal_shards``), and shuffles each rank's rows within
  windows of ``train.shuffle_window`` rows, so a rank reads each of its shards once per epoch (bar a rare
  bucket's leftovers) and holds a window at a time.

The mixture, one of two kinds (docs/shuffle.md):

- by ``repeats``: a source with repeats r contributes each of its rows floor(r) times, plus a fresh random
  (r - floor(r)) share of its rows, every epoch; its share of the epoch grows with its size.
- by ``weights``: an epoch draws ``samples`` rows (default: the split's row count), source s contributing
  n_s of them, n_s = samples x w_s / sum(w) rounded by largest remainder (so the n_s sum to ``samples``);
  without replacement each of its rows floor(n_s / rows_s) times plus a fresh random (n_s mod rows_s) of
  them once more, with replacement n_s independent uniform draws from its rows.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from concurrent.futures import Future

import numpy as np
import pyarrow as pa
import torch

from components import storage
from components.dataset import cached_batch, collate_rgb, decode_rgb
from components.diffusion.loss import Batch
from components.training.row_index import UNNAMED, RowIndex, read_index  # noqa: F401 - re-exported


def draws(index: RowIndex, repeats: dict[str, float], rng: np.random.Generator) -> np.ndarray:
    """The row ids one epoch draws, in canonical order: each row of a source with ``repeats`` r,
    floor(r) times, and a random (r - floor(r)) share of its rows once more (a fresh share each epoch)."""
    parts = []
    for code, name in enumerate(index.sources):
        r = float(repeats.get(name, 1.0))
        rows = np.flatnonzero(index.source == code)
        whole, frac = math.floor(r), r - math.floor(r)
        parts += [rows] * whole
        extra = int(round(frac * len(rows)))
        if extra:
            parts.append(np.sort(rng.choice(rows, size=extra, replace=False)))
    return np.sort(np.concatenate(parts), kind="stable") if parts else np.zeros(0, dtype=np.int64)


def shares(counts_total: int, weights: np.ndarray) -> np.ndarray:
    """``counts_total`` split in proportion to ``weights`` (>= 0, sum > 0) by largest remainder: integers that
    sum to ``counts_total``, each within 1 of its exact share (ties to the earlier source)."""
    exact = counts_total * weights / weights.sum()
    whole = np.floor(exact).astype(np.int64)
    short = counts_total - int(whole.sum())
    whole[np.argsort(-(exact - whole), kind="stable")[:short]] += 1
    return whole


def weighted_draws(index: RowIndex, weights: dict[str, float], rng: np.random.Generator,
                   samples: int | None = None, replace: bool = False) -> np.ndarray:
    """The row ids one epoch of a weighted mixture draws, in canonical order: ``samples`` rows (None: one per
    row of the split), source s's n_s of them in proportion to its weight (``shares``). Without replacement
    every row of s is drawn floor(n_s / rows_s) times and a fresh random n_s mod rows_s of them once more;
    with replacement n_s uniform draws. Every source of the index needs a weight (the index lists only
    sources with rows; ``driver.mixture`` refuses a weighted source that has none)."""
    missing = [name for name in index.sources if name not in weights]
    if missing:
        raise ValueError(f"weighted mixture: no weight for source(s) {missing} (weights: {weights})")
    w = np.array([float(weights[name]) for name in index.sources], dtype=np.float64)
    if (w < 0).any() or not w.sum() > 0:
        raise ValueError(f"weighted mixture: weights must be >= 0 and sum above 0, got {weights}")
    counts = shares(len(index) if samples is None else int(samples), w)
    parts = []
    for code, n in enumerate(counts.tolist()):
        rows = np.flatnonzero(index.source == code)
        if n == 0:
            continue
        if replace:
            parts.append(rng.choice(rows, size=n, replace=True))
            continue
        whole, extra = divmod(n, len(rows))
        parts += [rows] * whole
        if extra:
            parts.append(rng.choice(rows, size=extra, replace=False))
    return np.sort(np.concatenate(parts), kind="stable") if parts else np.zeros(0, dtype=np.int64)


def bucket_batch_ids(order: np.ndarray, bucket: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """``bucket_batches`` on row ids: one bucket per batch, in order of completion, leftovers dropped."""
    buffers: dict[int, list[int]] = {}
    out = []
    for i, b in zip(order.tolist(), bucket[order].tolist(), strict=True):
        buf = buffers.setdefault(b, [])
        buf.append(i)
        if len(buf) == batch_size:
            out.append(np.asarray(buf, dtype=np.int64))
            buffers[b] = []
    return out


def epoch_plan(index: RowIndex, *, seed: int, epoch: int, world: int, batch_size: int,
               repeats: dict[str, float] | None = None, weights: dict[str, float] | None = None,
               samples: int | None = None, replace: bool = False, mode: str = "global",
               window: int = 1024) -> list[list[np.ndarray]]:
    """Every rank's micro-batches of one epoch (``plan[rank][k]``: the row ids of its k-th micro-batch),
    the same number for each rank. The mixture is ``repeats`` (``draws``) or ``weights`` with ``samples`` and
    ``replace`` (``weighted_draws``), exactly one of the two. Deterministic in its arguments; a fresh order
    and fresh draws for every (seed, epoch)."""
    if (repeats is None) == (weights is None):
        raise ValueError("epoch_plan: give the mixture as repeats or as weights (exactly one)")
    rng = np.random.default_rng([seed, epoch])
    if weights is not None:
        chosen = weighted_draws(index, weights, rng, samples, replace)
    else:
        chosen = draws(index, repeats, rng)
    if mode == "global":
        batches = bucket_batch_ids(rng.permutation(chosen), index.bucket, batch_size)
        usable = len(batches) // world * world
        return [batches[rank:usable:world] for rank in range(world)]
    if mode != "blocks":
        raise ValueError(f"unknown epoch order {mode!r}")
    shards = rng.permutation(len(index.files))
    position = np.empty(len(shards), dtype=np.int64)
    position[shards] = np.arange(len(shards))
    owner = deal_shards(shards, np.bincount(index.file_of[chosen], minlength=len(shards)), world)
    plans = []
    for rank in range(world):
        mine = chosen[owner[index.file_of[chosen]] == rank]
        mine = mine[np.argsort(position[index.file_of[mine]], kind="stable")]  # the epoch's shard order
        local = np.random.default_rng([seed, epoch, rank])
        for start in range(0, len(mine), window):
            mine[start:start + window] = local.permutation(mine[start:start + window])
        plans.append(bucket_batch_ids(mine, index.bucket, batch_size))
    usable = min(len(p) for p in plans)
    return [p[:usable] for p in plans]


def deal_shards(order: np.ndarray, load: np.ndarray, world: int) -> np.ndarray:
    """The rank of each shard: shards by drawn rows, most first (ties in the epoch's ``order``), each to the rank
    with the fewest rows so far (ties to the lowest rank). Ranks end within one shard's draws of each other,
    so cutting them to the same number of batches drops little, even when a weighted or repeated source's
    shards draw more rows than the others'. Equal loads deal ``order`` round-robin."""
    owner = np.zeros(len(order), dtype=np.int64)
    totals = np.zeros(world, dtype=np.int64)
    for f in order[np.argsort(-load[order], kind="stable")].tolist():
        rank = int(np.argmin(totals))
        owner[f] = rank
        totals[rank] += load[f]
    return owner


def source_counts(index: RowIndex, batches: Iterable[np.ndarray]) -> dict[str, int]:
    """Rows drawn per source name in ``batches``."""
    counts = np.zeros(len(index.sources), dtype=np.int64)
    for ids in batches:
        counts += np.bincount(index.source[ids], minlength=len(index.sources))
    return {name: int(n) for name, n in zip(index.sources, counts, strict=True)}


def epoch_shares(index: RowIndex, batches: Iterable[np.ndarray]) -> dict[str, float]:
    """Each source's share of the rows in ``batches`` (an epoch's plan: the mixture it realised)."""
    counts = source_counts(index, batches)
    total = sum(counts.values()) or 1
    return {name: n / total for name, n in counts.items()}


class TableRows:
    """Rows of a split held in memory (Ray's object store): ``pos[i]`` is the table row of index row i."""

    def __init__(self, table, pos: np.ndarray):
        self.table = table
        self.pos = pa.array(pos)

    def take(self, ids: np.ndarray) -> list[dict]:
        return self.table.take(self.pos.take(ids)).to_pylist()


class ShardRows:
    """Rows of a split read from its shards as needed, the last ``keep`` shards held (a window's worth).

    Safe for the prefetch threads: a shard is read once however many threads ask for it at a time, and
    the lock is held only to look it up, so one thread's read does not hold up another's take from a shard
    already in memory."""

    def __init__(self, index: RowIndex, endpoint_url: str | None, keep: int):
        self.index, self.endpoint_url, self.keep = index, endpoint_url, max(2, keep)
        self._open: OrderedDict[int, Future] = OrderedDict()
        self._lock = threading.Lock()

    def _shard(self, f: int):
        with self._lock:
            entry, reader = self._open.get(f), False
            if entry is not None:
                self._open.move_to_end(f)
            else:
                entry, reader = Future(), True
                self._open[f] = entry
                while len(self._open) > self.keep:
                    self._open.popitem(last=False)
        if reader:  # this thread reads it; any other asking meanwhile waits on the same future
            try:
                entry.set_result(storage.read_parquet(self.index.files[f], self.endpoint_url))
            except BaseException as err:
                entry.set_exception(err)
                with self._lock:
                    if self._open.get(f) is entry:
                        del self._open[f]  # the next take reads it again
        return entry.result()

    def take(self, ids: np.ndarray) -> list[dict]:
        """The rows of ``ids``, in order: one Arrow ``take`` per shard they lie in."""
        ids = np.asarray(ids)
        files, places = self.index.file_of[ids], self.index.row_in_file[ids]
        out: list[dict | None] = [None] * len(ids)
        for f in dict.fromkeys(files.tolist()):
            at = np.flatnonzero(files == f)
            for i, row in zip(at, self._shard(f).take(pa.array(places[at])).to_pylist(), strict=True):
                out[i] = row
        return out


def rows_to_batch(rows: list[dict], device: torch.device | str = "cpu") -> Batch:
    def pair(a: str, b: str) -> torch.Tensor:
        return torch.tensor([[int(r[a]), int(r[b])] for r in rows], dtype=torch.float32, device=device)

    sizes = dict(
        captions=[str(r["caption"]) for r in rows],
        original_size=pair("original_h", "original_w"),
        crop_top_left=pair("crop_top", "crop_left"),
        target_size=pair("target_h", "target_w"),
    )
    if "latent_dist" in rows[0]:  # a latent cache written by components/curation/latents.py
        dist, embeds, pooled = (t.to(device) for t in cached_batch(rows))
        return Batch(pixels=None, latent_dist=dist, prompt_embeds=embeds, pooled_embeds=pooled, **sizes)
    pixels = collate_rgb([decode_rgb(r["image"]) for r in rows]).to(device)  # (B, 3, H, W) uint8
    return Batch(pixels=pixels, **sizes)


def bucket_batches(rows: Iterable[dict], batch_size: int) -> Iterator[list[dict]]:
    """Group a row stream into batches of one bucket each, in order of completion.

    Rows of a bucket wait in its buffer until ``batch_size`` have arrived; leftovers at the end of
    the stream (fewer than a batch per bucket) are dropped, as a drop_last loader would.
    """
    buffers: dict[str, list[dict]] = {}
    for row in rows:
        buf = buffers.setdefault(str(row["bucket"]), [])
        buf.append(row)
        if len(buf) == batch_size:
            yield buf
            buffers[str(row["bucket"])] = []


def skip(rows: Iterable[dict], n: int) -> Iterator[dict]:
    """Drop the first ``n`` rows (already consumed before a resume)."""
    it = iter(rows)
    for _ in range(n):
        if next(it, None) is None:
            return
    yield from it
