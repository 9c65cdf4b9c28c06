"""The curated-dataset contract between curation (the writer) and training and evaluation (the readers).

Layout of a curated dataset at ``ROOT`` (a local directory or ``s3://bucket/prefix``):

    ROOT/train/part-*.parquet   ROOT/val/part-*.parquet   ROOT/report.json   ROOT/_SUCCESS

``_SUCCESS`` is written last (a JSON manifest with the shard list and the digest); a dataset
without it is incomplete and is refused, so a crashed curation never looks complete.

Two row layouts share it: ``SCHEMA`` (a curated JPEG per row) and ``LATENT_SCHEMA`` (the latent cache:
the same metadata, the VAE posterior and text embeddings instead of the JPEG). Both are defined here
once; everything else derives from them.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from PIL import Image

from components.config import RecurringError
from components.storage import Store, child, join, read_parquet

SUCCESS = "_SUCCESS"
REPORT = "report.json"
SPLITS = ("train", "val")

METADATA = [
    ("caption", pa.string()),
    ("original_h", pa.int32()),  # true pre-resize size (SDXL micro-conditioning)
    ("original_w", pa.int32()),
    ("crop_top", pa.int32()),  # crop top-left in the resized image
    ("crop_left", pa.int32()),
    ("target_h", pa.int32()),
    ("target_w", pa.int32()),
    ("bucket", pa.string()),  # "WxH"
    ("source", pa.string()),
    ("sha256", pa.string()),  # of the source file's bytes
    ("source_name", pa.string()),  # the curation source it came from (``curate.sources[].name``)
    ("caption_origin", pa.string()),  # column, sidecar, model, filename or empty
    ("watermark_check", pa.string()),  # passed, unchecked (a threshold but no score) or off (no threshold)
    ("luma_clamped", pa.bool_()),  # darkened to ``max_luminance`` (``luminance_policy: clamp``); null: curated before
]
SCHEMA = pa.schema([("image", pa.binary()), *METADATA])  # image: JPEG of the crop, exactly target size
LATENT_SCHEMA = pa.schema(
    [
        *METADATA,
        ("latent_dist", pa.binary()),  # (2C, h, w): posterior mean then log-variance
        ("latent_shape", pa.list_(pa.int32())),
        ("prompt_embeds", pa.binary()),  # (77, D1 + D2)
        ("embeds_shape", pa.list_(pa.int32())),
        ("pooled_embeds", pa.binary()),  # (P2,)
        ("dtype", pa.string()),
    ]
)


def blank_row(schema: pa.Schema = SCHEMA) -> dict:
    """A row of ``schema``'s columns with empty values (the placeholder for a dropped record)."""
    empty = {pa.binary(): b"", pa.string(): "", pa.int32(): 0}
    return {f.name: empty.get(f.type) for f in schema}


class IncompleteDatasetError(RecurringError):
    pass


@dataclass(frozen=True)
class CuratedManifest:
    root: str
    digest: str
    files: dict[str, list[str]]  # split -> shard paths relative to root
    rows: dict[str, int]
    endpoint_url: str | None = None
    nbytes: dict[str, int] | None = None
    """split -> the rows' size in memory (Arrow), when the writer recorded it."""
    sources: dict[str, dict] | None = None
    """source name -> what curation recorded of it (``kind``, ``repeats``, rows per split); None for a
    dataset curated before sources had names (its rows then count as one source)."""

    def paths(self, split: str) -> list[str]:
        return [join(self.root, f) for f in self.files.get(split, [])]


def read_manifest(root: str, endpoint_url: str | None = None) -> CuratedManifest:
    """The manifest of a finished curation at ``root``; ``IncompleteDatasetError`` otherwise."""
    blob = Store(endpoint_url).read_if_exists(join(root, SUCCESS))
    if blob is None:
        raise IncompleteDatasetError(
            f"{root} has no {SUCCESS} marker: curation did not finish there; run flows/curate.py first"
        )
    data = json.loads(blob)
    for split, files in data["files"].items():
        for rel in files:  # readers open root/rel: a list that points elsewhere is refused, not followed
            try:
                child(root, rel)
            except ValueError:
                raise IncompleteDatasetError(f"{root}/{SUCCESS} lists {split} shard {rel!r}, which is outside the "
                                             "dataset: refused (rerun flows/curate.py into this output)") from None
    return CuratedManifest(root=root, digest=data["digest"], files=data["files"], rows=data["rows"],
                           endpoint_url=endpoint_url, nbytes=data.get("nbytes"), sources=data.get("sources"))


def success_text(digest: str, files: dict[str, list[str]], rows: dict[str, int], **extra) -> str:
    """The body of ``_SUCCESS`` that ``read_manifest`` parses (extra keys are informational)."""
    return json.dumps({"digest": digest, "files": files, "rows": rows, **extra}, indent=2, sort_keys=True)


def val_rows(manifest: CuratedManifest, limit: int) -> list[dict]:
    """The first ``limit`` held-out rows, in shard order (small: read directly, not through Ray Data)."""
    rows: list[dict] = []
    for path in manifest.paths("val"):
        rows += read_parquet(path, manifest.endpoint_url).to_pylist()
        if len(rows) >= limit:
            break
    return rows[:limit]


# --- reading rows ----------------------------------------------------------------------------------


def decode_rgb(data: bytes) -> np.ndarray:
    """A curated JPEG -> (H, W, 3) uint8 array: Pillow and numpy only (no torch op, so no intra-op thread
    pool is woken by a loader thread)."""
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def decode_image(data: bytes):
    """A curated JPEG -> (3, H, W) float32 tensor in [-1, 1] (the scaling of
    ``components.diffusion.loss.unit_range``)."""
    import torch  # torch on first use: curation and the registry read datasets through this module without it

    return torch.from_numpy(decode_rgb(data).copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def collate_rgb(images: list[np.ndarray]):
    """Same-size (H, W, 3) uint8 images -> a contiguous (B, 3, H, W) uint8 tensor, in one numpy copy (no torch
    op: a loader thread wakes no intra-op thread pool). Training batches stay uint8 until the step's device (a
    quarter of the bytes of float32 to move; the scaling to [-1, 1] is done there by
    ``components.diffusion.loss.unit_range``). Contiguous, as the float batches were: a channels-last batch
    takes other convolution kernels, and its losses differ in the fourth digit."""
    import torch  # torch on first use (see decode_image)

    out = np.empty((len(images), 3, *images[0].shape[:2]), dtype=np.uint8)
    for i, im in enumerate(images):
        out[i] = im.transpose(2, 0, 1)
    return torch.from_numpy(out)


def cached_batch(rows: list[dict]):
    """Latent-cache rows of one bucket -> (latent_dist (B, 2C, h, w), prompt_embeds (B, 77, D), pooled_embeds
    (B, P)) float32 tensors: each column's bytes joined and read as one array (no tensor per row)."""
    import torch  # torch on first use (see decode_image)

    dtype = rows[0]["dtype"]
    if any(r["dtype"] != dtype or r["latent_shape"] != rows[0]["latent_shape"] for r in rows):
        raise ValueError("latent-cache rows of one batch differ in dtype or latent shape")

    def column(name: str, shape) -> torch.Tensor:
        values = np.frombuffer(b"".join(r[name] for r in rows), dtype=dtype)
        return torch.from_numpy(values.astype(np.float32).reshape(len(rows), *shape))

    return (column("latent_dist", rows[0]["latent_shape"]), column("prompt_embeds", rows[0]["embeds_shape"]),
            column("pooled_embeds", (-1,)))


def cached_tensors(row: dict):
    """One latent-cache row -> (latent_dist (2C, h, w), prompt_embeds (77, D), pooled_embeds (P,)),
    float32 tensors."""
    import torch  # torch on first use (see decode_image)

    def arr(name: str, shape=None) -> torch.Tensor:
        values = np.frombuffer(row[name], dtype=row["dtype"]).astype(np.float32)
        return torch.from_numpy(values.reshape(shape) if shape is not None else values)

    return arr("latent_dist", row["latent_shape"]), arr("prompt_embeds", row["embeds_shape"]), arr("pooled_embeds")
