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
                            seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    h, w = size
    files, rows, nbytes = {}, {}, {}
    for split, n in (("train", n_train), ("val", n_val)):
        images = [_image(rng, h, w) for _ in range(n)]
        table = pa.table(
            {
                "image": images,
                "caption": [CAPTIONS[i % len(CAPTIONS)] for i in range(n)],
                "original_h": [h * 2] * n, "original_w": [w * 2] * n,
                "crop_top": [0] * n, "crop_left": [0] * n,
                "target_h": [h] * n, "target_w": [w] * n,
                "bucket": [f"{w}x{h}"] * n,
                "source": [f"synthetic/{split}/{i}.jpg" for i in range(n)],
                "sha256": [hashlib.sha256(b).hexdigest() for b in images],
            },
            schema=SCHEMA,
        )
        (root / split).mkdir(parents=True, exist_ok=True)
        pq.write_table(table, root / split / "part-00000.parquet")
        files[split] = [f"{split}/part-00000.parquet"]
        rows[split] = n
        nbytes[split] = table.nbytes
    digest = hashlib.sha256(json.dumps(files).encode() + str(seed).encode()).hexdigest()[:16]
    (root / REPORT).write_text(json.dumps({"inputs": n_train + n_val, "kept": n_train + n_val}))
    (root / SUCCESS).write_text(json.dumps({"digest": digest, "files": files, "rows": rows, "nbytes": nbytes}))
    return root
