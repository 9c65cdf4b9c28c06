"""Training on curation's latent cache is the same computation as training on raw pixels."""

from __future__ import annotations

import numpy as np
import torch

from components.config import Config, Precision
from components.diffusion.conditioning import encode_text
from components.diffusion.loss import LossSpec, NoiseDraw, diffusion_loss
from components.diffusion.schedule import training_scheduler
from components.diffusion.sdxl import build_tiny
from components.training.batches import rows_to_batch
from tests.synthetic import write_synthetic_curated


def _cached_row(parts, raw: dict) -> dict:
    """What components/curation/latents.py stores for one curated row (float32 here)."""
    pixels = rows_to_batch([raw]).pixels
    with torch.no_grad():
        dist = parts.vae.encode(pixels).latent_dist
        params = torch.cat([dist.mean, dist.logvar], dim=1)[0]
        embeds, pooled = encode_text(parts, [raw["caption"]], "cpu")
    row = {k: v for k, v in raw.items() if k != "image"}
    row.update(
        latent_dist=params.numpy().astype(np.float32).tobytes(), latent_shape=list(params.shape),
        prompt_embeds=embeds[0].numpy().astype(np.float32).tobytes(), embeds_shape=list(embeds[0].shape),
        pooled_embeds=pooled[0].numpy().astype(np.float32).tobytes(), dtype="float32",
    )
    return row


def test_cached_and_raw_batches_give_the_same_loss(tmp_path):
    import pyarrow.parquet as pq

    cfg = Config()
    parts = build_tiny(cfg.model.tiny)
    root = write_synthetic_curated(tmp_path / "d", n_train=2, n_val=1, size=(64, 64))
    raw_rows = pq.read_table(root / "train" / "part-00000.parquet").to_pylist()
    cached_rows = [_cached_row(parts, r) for r in raw_rows]
    spec = LossSpec(training_scheduler(cfg.diffusion), cfg.diffusion, Precision.FP32)
    t = torch.tensor([10, 900])

    def loss(rows):
        draw = NoiseDraw(torch.Generator().manual_seed(3), timesteps=t)
        return diffusion_loss(parts, parts.unet, rows_to_batch(rows), spec, draw).item()

    raw, cached = loss(raw_rows), loss(cached_rows)
    assert rows_to_batch(cached_rows).pixels is None
    assert abs(raw - cached) <= 1e-4 * max(1.0, abs(raw)), (raw, cached)
