"""Webdataset tar shards written by the tests themselves: one tar per call, members in the order given, each
sample's members adjacent (the webdataset rule Ray's reader relies on), as img2dataset writes them."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path


def write_shard(path: Path, samples: dict[str, dict[str, bytes]]) -> Path:
    """``samples``: key (``s/0001``) -> member extension (``jpg``, ``txt``, ``json``) -> bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for key, members in samples.items():
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path
