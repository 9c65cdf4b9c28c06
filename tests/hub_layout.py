"""Small datasets in the layouts the URL and Hugging Face sources read, written by the tests themselves.

``write_hub_dataset``: a dataset repository as ``datasets``' ``push_to_hub`` leaves it (docs/sources.md):
``README.md`` with the ``configs`` front matter, ``data/<split>-NNNNN-of-NNNNN.parquet`` shards whose image
column is the ``{bytes, path}`` struct of the ``Image`` feature, and the features in the parquet schema's
``huggingface`` metadata. ``write_laion_parquet``: LAION's metadata columns (URL, TEXT, WIDTH, HEIGHT,
similarity, punsafe, pwatermark).
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

IMAGE_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def write_hub_dataset(root: Path, splits: dict[str, list[dict]], caption: str = "prompt") -> Path:
    """``splits``: split -> rows of ``{"bytes": ..., "path": ..., caption: ...}``."""
    (root / "data").mkdir(parents=True, exist_ok=True)
    features = {"image": {"_type": "Image"}, caption: {"dtype": "string", "_type": "Value"}}
    schema = pa.schema([("image", IMAGE_STRUCT), (caption, pa.string())],
                       metadata={"huggingface": json.dumps({"info": {"features": features}})})
    for split, rows in splits.items():
        table = pa.table({"image": [{"bytes": r.get("bytes"), "path": r.get("path")} for r in rows],
                          caption: [r.get(caption) for r in rows]}, schema=schema)
        pq.write_table(table, root / "data" / f"{split}-00000-of-00001.parquet")
    configs = "".join(f"  - split: {s}\n    path: data/{s}-*\n" for s in splits)
    (root / "README.md").write_text(f"---\nconfigs:\n- config_name: default\n  data_files:\n{configs}---\n# test set\n")
    return root


def write_laion_parquet(path: Path, rows: list[dict]) -> Path:
    """LAION's column names and types; missing scores are nulls."""
    schema = pa.schema([("URL", pa.string()), ("TEXT", pa.string()), ("WIDTH", pa.int32()), ("HEIGHT", pa.int32()),
                        ("similarity", pa.float64()), ("punsafe", pa.float64()), ("pwatermark", pa.float64())])
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path
