"""A small curated dataset written straight to the contract in components/dataset.py, so the
training tests do not depend on the curation pipeline (which has tests of its own)."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from components.dataset import REPORT, SCHEMA, SUCCESS

CAPTIONS = ["a dark room at night", "a bright snowy field", "a red apple", "a blue sky", "a green forest"]


def _image(rng: np.random.Generator, h: int, w: int) -> bytes:
    base = rng.uniform(0, 255, size=3)
    grad = np.linspace(-40, 40, w)[None, :, None]
    arr = np.clip(base[None, None, :] + grad + rng.normal(0, 8, size=(h, w, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_synthetic_curated(root: Path, n_train: int = 16, n_val: int = 4, size: tuple[int, int] = (64, 64),
                            seed: int = 0, *, sources: dict[str, float] | None = None, shards: int = 1,
                            sizes: list[tuple[int, int]] | None = None) -> Path:
    """A curated dataset of ``n_train``/``n_val`` rows. ``sources``: source name -> the ``repeats`` recorded
    for it (rows dealt to the sources in turn; default one source, ``default``); ``shards``: train shards;
    ``sizes``: (h, w) of the buckets, dealt to the rows in turn (default ``[size]``)."""
    rng = np.random.default_rng(seed)
    sources = sources or {"default": 1.0}
    names, sizes = list(sources), sizes or [size]
    files, rows, nbytes = {}, {}, {}
    per_source: dict[str, dict[str, int]] = {n: {} for n in names}
    for split, n in (("train", n_train), ("val", n_val)):
        shapes = [sizes[i % len(sizes)] for i in range(n)]
        images = [_image(rng, h, w) for h, w in shapes]
        owner = [names[i % len(names)] for i in range(n)]
        table = pa.table(
            {
                "image": images,
                "caption": [CAPTIONS[i % len(CAPTIONS)] for i in range(n)],
                "original_h": [h * 2 for h, _ in shapes], "original_w": [w * 2 for _, w in shapes],
                "crop_top": [0] * n, "crop_left": [0] * n,
                "target_h": [h for h, _ in shapes], "target_w": [w for _, w in shapes],
                "bucket": [f"{w}x{h}" for h, w in shapes],
                "source": [f"synthetic/{split}/{i}.jpg" for i in range(n)],
                "sha256": [hashlib.sha256(b).hexdigest() for b in images],
                "source_name": owner, "caption_origin": ["column"] * n, "watermark_check": ["off"] * n,
                "luma_clamped": [False] * n,
            },
            schema=SCHEMA,
        )
        for name in owner:
            per_source[name][split] = per_source[name].get(split, 0) + 1
        (root / split).mkdir(parents=True, exist_ok=True)
        parts = shards if split == "train" else 1
        step = -(-n // parts)
        files[split] = []
        for k, start in enumerate(range(0, n, step)):
            pq.write_table(table.slice(start, step), root / split / f"part-{k:05d}.parquet")
            files[split].append(f"{split}/part-{k:05d}.parquet")
        rows[split] = n
        nbytes[split] = table.nbytes
    digest = hashlib.sha256(json.dumps(files).encode() + str(seed).encode()).hexdigest()[:16]
    recorded = {name: {"kind": "files", "repeats": repeats, "rows": per_source[name]}
                for name, repeats in sources.items()}
    (root / REPORT).write_text(json.dumps({"inputs": n_train + n_val, "kept": n_train + n_val}))
    (root / SUCCESS).write_text(json.dumps({"digest": digest, "files": files, "rows": rows, "nbytes": nbytes,
                                            "sources": recorded}))
    return root
