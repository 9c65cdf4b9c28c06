"""The optional latent cache: VAE posteriors and text embeddings equal to encoding the curated rows
directly with the same model, in the contract layout with the source's splits."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from components import dataset
from components.config import load_config
from components.curation.latents import cache_latents
from components.curation.process import Curator
from components.curation.writer import aggregate, begin, outcomes_table, publish, write_shard
from components.dataset import LATENT_SCHEMA, cached_tensors, decode_image
from components.diffusion.conditioning import encode_text
from components.diffusion.loss import encode_latents, sample_latents
from components.diffusion.sdxl import load_parts
from components.storage import Store

REPO = Path(__file__).resolve().parents[2]


def small_curated_dataset(cfg, tmp_path: Path) -> str:
    """A curated dataset written without Ray (same writer), 6 images in two buckets."""
    curator, outcomes = Curator(cfg.curate, cfg.seed), []
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate([(300, 300)] * 3 + [(400, 260)] * 3):
        path = tmp_path / f"img{i}.png"
        Image.fromarray(rng.integers(0, 200, size=(h, w, 3), dtype=np.uint8)).save(path)
        outcomes.append(curator.process({"source": str(path), "caption": f"picture number {i}"}))
    root, store = str(tmp_path / "ds"), Store()
    begin(store, root)
    agg = aggregate([write_shard(store, root, "t-00000", outcomes_table(outcomes, cfg.curate.holdout_fraction))])
    publish(store, root, "t", agg, cfg.curate.holdout_fraction, {"inputs": agg["inputs"]})
    return root


@pytest.mark.slow  # loads torch/diffusers in a Ray actor: seconds of imports
def test_latent_cache_matches_direct_encoding(ray_local, tmp_path):
    cfg = load_config(REPO / "flows/configs/tiny.yaml", ["curate.workers=1", "curate.cache_dtype=float32",
                                                         f"state_dir={tmp_path / 'state'}"])
    source = small_curated_dataset(cfg, tmp_path)
    report = cache_latents(cfg, source=source)
    src, cache = dataset.read_manifest(source), dataset.read_manifest(report["output"])
    assert cache.rows == src.rows and report["source_digest"] == src.digest

    parts = load_parts(cfg.model, cfg.state_path("cache"))
    originals = {r["sha256"]: r for r in pq.read_table(src.paths("train") + src.paths("val")).to_pylist()}
    cached = pq.read_table(cache.paths("train") + cache.paths("val"))
    assert cached.schema.equals(LATENT_SCHEMA) and cached.num_rows == 6
    for row in cached.to_pylist():
        orig = originals[row["sha256"]]
        dist, embeds, pooled = cached_tensors(row)
        with torch.no_grad():
            want = parts.vae.encode(decode_image(orig["image"])[None]).latent_dist.parameters[0]
            want_embeds, want_pooled = encode_text(parts, [orig["caption"]], "cpu")
        assert dist.shape == (8, row["target_h"] // 8, row["target_w"] // 8)
        torch.testing.assert_close(dist, want, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(embeds, want_embeds[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(pooled, want_pooled[0], atol=1e-5, rtol=1e-5)
        assert ((row["original_h"], row["crop_top"], row["bucket"])
                == (orig["original_h"], orig["crop_top"], orig["bucket"]))
    # A sample from the cached posterior is what step.encode_latents draws from the pixels.
    gen_a, gen_b = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    z = sample_latents(dist[None], gen_a, parts.vae.config.scaling_factor)
    z_ref = encode_latents(parts, decode_image(orig["image"])[None], gen_b)
    torch.testing.assert_close(z, z_ref, atol=1e-4, rtol=1e-4)
    assert Image.open(io.BytesIO(orig["image"])).size == (row["target_w"], row["target_h"])
