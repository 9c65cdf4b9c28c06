"""From curated rows to training batches: decode, group by aspect bucket, resume at a position.

Batches never mix buckets (their images differ in size). Rows stream in a deterministic order for a
given seed and epoch, so a resumed run can skip exactly the rows it had already consumed.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from components.dataset import cached_tensors, decode_image
from components.diffusion.loss import Batch


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
        dist, embeds, pooled = (torch.stack(t).to(device) for t in zip(*map(cached_tensors, rows), strict=True))
        return Batch(pixels=None, latent_dist=dist, prompt_embeds=embeds, pooled_embeds=pooled, **sizes)
    pixels = torch.stack([decode_image(r["image"]) for r in rows]).to(device)  # (B, 3, H, W)
    return Batch(pixels=pixels, **sizes)


def iter_rows(batches: Iterable[dict]) -> Iterator[dict]:
    """Column batches (dict of arrays, as Ray Data yields them) -> one dict per row."""
    for cols in batches:
        keys = list(cols)
        for i in range(len(cols[keys[0]])):
            yield {k: cols[k][i] for k in keys}


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
