"""The train split's row index: each row's shard, place, bucket and source, a few bytes per row.

It travels in Ray Train's loop config, so it lives apart from the batching code: Train's controller
unpickles the config, and this module imports only numpy (``batches`` imports torch and diffusers).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from components import storage

UNNAMED = "default"
"""The source of rows curated before sources had names (no ``source_name`` column)."""


@dataclass(frozen=True)
class RowIndex:
    """The train split, one entry per row, in its canonical order: the shards as ``_SUCCESS`` lists them,
    rows in shard order. Small (a few bytes per row): every rank holds it whole."""

    files: tuple[str, ...]  # shard URIs
    file_of: np.ndarray  # (N,) int32: the shard of each row
    row_in_file: np.ndarray  # (N,) int32
    bucket: np.ndarray  # (N,) int32 codes into ``buckets``
    source: np.ndarray  # (N,) int32 codes into ``sources``
    buckets: tuple[str, ...]
    sources: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.file_of)

    @classmethod
    def from_columns(cls, files: list[str], columns: list[tuple[list[str], list[str | None]]]) -> RowIndex:
        """``columns``: per shard, its (bucket, source_name) columns."""
        buckets = sorted({b for bs, _ in columns for b in bs})
        sources = sorted({s or UNNAMED for _, ss in columns for s in ss})
        b_code, s_code = {b: i for i, b in enumerate(buckets)}, {s: i for i, s in enumerate(sources)}
        file_of, row_in_file, bucket, source = [], [], [], []
        for f, (bs, ss) in enumerate(columns):
            file_of += [f] * len(bs)
            row_in_file += range(len(bs))
            bucket += [b_code[b] for b in bs]
            source += [s_code[s or UNNAMED] for s in ss]
        as32 = lambda v: np.asarray(v, dtype=np.int32)  # noqa: E731
        return cls(tuple(files), as32(file_of), as32(row_in_file), as32(bucket), as32(source), tuple(buckets),
                   tuple(sources))


def read_index(paths: list[str], endpoint_url: str | None = None) -> RowIndex:
    """The index of a split from its shards' ``bucket`` and ``source_name`` columns only (a column read per
    shard, in threads)."""
    def one(path: str) -> tuple[list[str], list[str | None]]:
        table = storage.read_parquet(path, endpoint_url, columns=["bucket", "source_name"])
        sources = table["source_name"].to_pylist() if "source_name" in table.column_names else [None] * table.num_rows
        return [str(b) for b in table["bucket"].to_pylist()], sources

    with ThreadPoolExecutor(max_workers=16) as pool:
        return RowIndex.from_columns(list(paths), list(pool.map(one, paths)))
