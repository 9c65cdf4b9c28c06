"""Training on curation's latent cache is the same computation as training on raw pixels."""

from __future__ import annotations

import dataclasses

import pyarrow.parquet as pq
import torch

from components.config import Config, Precision
from components.diffusion.conditioning import encode_text
from components.diffusion.loss import LossSpec, NoiseDraw, diffusion_loss, unit_range
from components.diffusion.schedule import training_scheduler
from components.diffusion.tiny import build_tiny
from components.training.batches import rows_to_batch
from tests.synthetic import write_synthetic_curated


def _cached_row(parts, raw: dict, dtype: str = "float32") -> dict:
    """What components/curation/latents.py stores for one curated row (float32 unless said)."""
    pixels = unit_range(rows_to_batch([raw]).pixels)
    with torch.no_grad():
        dist = parts.vae.encode(pixels).latent_dist
        params = torch.cat([dist.mean, dist.logvar], dim=1)[0]
        embeds, pooled = encode_text(parts, [raw["caption"]], "cpu")
    row = {k: v for k, v in raw.items() if k != "image"}
    row.update(
        latent_dist=params.numpy().astype(dtype).tobytes(), latent_shape=list(params.shape),
        prompt_embeds=embeds[0].numpy().astype(dtype).tobytes(), embeds_shape=list(embeds[0].shape),
        pooled_embeds=pooled[0].numpy().astype(dtype).tobytes(), dtype=dtype,
    )
    return row


def test_cached_and_raw_batches_give_the_same_loss(tmp_path):
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


def test_batches_carry_uint8_pixels_and_the_loss_scales_them_on_its_device(tmp_path):
    """The loader collates decoded JPEGs as uint8 (a quarter of the bytes to move to the device, no torch op
    in a loader thread); the loss on them equals the loss on the same pixels given in [-1, 1]."""
    cfg = Config()
    parts = build_tiny(cfg.model.tiny)
    root = write_synthetic_curated(tmp_path / "d", n_train=2, n_val=1, size=(64, 64))
    rows = pq.read_table(root / "train" / "part-00000.parquet").to_pylist()
    batch = rows_to_batch(rows)
    assert batch.pixels.dtype == torch.uint8 and batch.pixels.shape == (2, 3, 64, 64) and batch.pixels.is_contiguous()
    scaled = dataclasses.replace(batch, pixels=unit_range(batch.pixels))
    assert scaled.pixels.dtype == torch.float32 and -1.0 <= scaled.pixels.min() < scaled.pixels.max() <= 1.0
    spec = LossSpec(training_scheduler(cfg.diffusion), cfg.diffusion, Precision.FP32)

    def loss(b):
        draw = NoiseDraw(torch.Generator().manual_seed(3), timesteps=torch.tensor([10, 900]))
        return diffusion_loss(parts, parts.unet, b, spec, draw).item()

    assert loss(batch) == loss(scaled)


def test_a_float16_cache_moves_the_loss_by_less_than_its_stated_error(tmp_path):
    """``curate.cache_dtype`` float16 (the default; docs/benchmarks.md states the error): the stored posterior
    and embeddings round to 11 significant bits, and the loss on a batch moves by less than 0.01 %."""
    cfg = Config()
    parts = build_tiny(cfg.model.tiny)
    root = write_synthetic_curated(tmp_path / "d", n_train=4, n_val=1, size=(64, 64))
    raw = pq.read_table(root / "train" / "part-00000.parquet").to_pylist()
    full, half = ([_cached_row(parts, r, dtype) for r in raw] for dtype in ("float32", "float16"))
    a, b = rows_to_batch(full), rows_to_batch(half)
    assert b.latent_dist.dtype == torch.float32 and b.latent_dist.shape == a.latent_dist.shape == (4, 8, 8, 8)
    pairs = ((a.latent_dist, b.latent_dist), (a.prompt_embeds, b.prompt_embeds), (a.pooled_embeds, b.pooled_embeds))
    for x, y in pairs:
        assert 0 < (x - y).abs().max() <= 2.0**-11 * x.abs().max()  # rounded, not lost
    spec = LossSpec(training_scheduler(cfg.diffusion), cfg.diffusion, Precision.FP32)

    def loss(batch):
        draw = NoiseDraw(torch.Generator().manual_seed(5), timesteps=torch.tensor([10, 300, 600, 900]))
        return diffusion_loss(parts, parts.unet, batch, spec, draw).item()

    assert abs(loss(b) - loss(a)) <= 1e-4 * abs(loss(a))  # fp16 latents move the loss far less than this
