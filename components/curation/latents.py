"""Optional stage: cache VAE posteriors and text embeddings of a curated dataset.

Reads a published curated dataset, encodes every row with an actor pool that loads the model once
per actor (CPU here; ``num_gpus=1`` actors on a GPU cluster via ``curate.cache_num_gpus``), and
writes a cached dataset in the same contract layout (train/val shards, report.json, ``_SUCCESS``
last, same splits as its source) whose columns are ``dataset.LATENT_SCHEMA``.

What is cached, and why it changes nothing in training:
- ``latent_dist``: the VAE posterior's parameters (mean and log-variance, (2C, H/8, W/8)), not a
  sample: training draws ``z = mean + std * eps`` from its own generator at every step, exactly as
  ``components.diffusion.loss.encode_latents`` does from raw pixels (``components.diffusion.loss.sample_latents``).
- ``prompt_embeds`` (77, D1 + D2) and ``pooled_embeds`` (P2): SDXL's penultimate hidden states of
  both encoders and encoder 2's projected pooled output (``components.diffusion.conditioning.encode_text``).
  Caption dropout zeroes embeddings after encoding, so it applies to cached ones unchanged.
Precision follows the platform policy (components/diffusion/loss.py): the VAE encodes in fp32; text
encoders run in fp32 here; tensors are stored as ``curate.cache_dtype``.
"""

from __future__ import annotations

import time
import uuid

import pyarrow as pa
import ray

from components import dataset
from components.config import Config
from components.curation.remote import worker_args, write_to
from components.curation.writer import CuratedDatasink, aggregate, begin, publish, stage_schema
from components.dataset import collate_rgb, decode_rgb
from components.storage import Store, arrow_filesystem


class EncodeBatch:
    """Ray Data callable class: curated rows in, cached rows out. Loads the model once per actor."""

    def __init__(self, config: dict, device: str, dtype: str):
        # torch and the model load in the encoding actor's process, not in the driver that imports this module
        import torch

        from components.registry.model_sources import load_source_parts

        cfg = Config.model_validate(config)
        self.device = torch.device(device)
        self.parts = load_source_parts(cfg)
        for module in (self.parts.vae, self.parts.text_encoder, self.parts.text_encoder_2):
            module.to(self.device).eval().requires_grad_(False)
        self.dtype = dtype

    def __call__(self, batch: pa.Table) -> pa.Table:
        import torch  # in the actor's process (see __init__)

        from components.diffusion.conditioning import encode_text
        from components.diffusion.loss import unit_range

        rows = batch.to_pylist()
        out: list[dict | None] = [None] * len(rows)
        by_bucket: dict[str, list[int]] = {}
        for i, r in enumerate(rows):
            by_bucket.setdefault(r["bucket"], []).append(i)  # one VAE call per image size
        with torch.no_grad():
            for idx in by_bucket.values():
                pixels = collate_rgb([decode_rgb(rows[i]["image"]) for i in idx]).to(self.device)  # (B, 3, H, W) uint8
                params = self.parts.vae.encode(unit_range(pixels)).latent_dist.parameters  # (B, 2C, h, w)
                embeds, pooled = encode_text(self.parts, [rows[i]["caption"] for i in idx], self.device)
                for j, i in enumerate(idx):
                    out[i] = self._row(rows[i], params[j], embeds[j], pooled[j])
        return pa.Table.from_pylist(out, schema=latent_stage_schema())

    def _row(self, row: dict, params, embeds, pooled) -> dict:
        def raw(t) -> bytes:
            return t.detach().float().cpu().numpy().astype(self.dtype).tobytes()

        keep = {k: v for k, v in row.items() if k in dataset.LATENT_SCHEMA.names}
        return {**keep, "latent_dist": raw(params), "latent_shape": list(params.shape), "prompt_embeds": raw(embeds),
                "embeds_shape": list(embeds.shape), "pooled_embeds": raw(pooled), "dtype": self.dtype,
                "split": row["split"], "reason": None, "detail": None}


def latent_stage_schema() -> pa.Schema:
    return stage_schema(dataset.LATENT_SCHEMA)


def cache_latents(cfg: Config, source: str | None = None, output: str | None = None) -> dict:
    """Encode the curated dataset at ``source`` (default ``curate.output``) into ``output``
    (default ``curate.cache_output`` or ``<source>-latents``); returns the cache's report. Needs Ray."""
    c = cfg.curate
    source = source or c.output
    output = output or c.cache_output or source.rstrip("/") + "-latents"
    manifest = dataset.read_manifest(source, c.s3_endpoint_url)
    store = Store(c.s3_endpoint_url)
    run_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
    begin(store, output)
    start = time.perf_counter()
    datasets = []
    for split in dataset.SPLITS:
        paths = manifest.paths(split)
        if paths:
            ds = ray.data.read_parquet(paths, filesystem=arrow_filesystem(source, c.s3_endpoint_url))
            datasets.append(ds.add_column("split", lambda t, s=split: pa.array([s] * t.num_rows),
                                          batch_format="pyarrow"))
    results = []
    if datasets:
        ds = datasets[0].union(*datasets[1:]) if len(datasets) > 1 else datasets[0]
        device = "cuda" if c.cache_num_gpus > 0 else "cpu"
        ds = ds.map_batches(
            EncodeBatch,
            fn_constructor_kwargs={"config": cfg.model_dump(mode="json"), "device": device, "dtype": c.cache_dtype},
            compute=ray.data.ActorPoolStrategy(size=c.cache_workers),
            batch_size=c.batch_size,
            batch_format="pyarrow",
            num_gpus=c.cache_num_gpus,
            **worker_args(cfg, num_cpus=1),
        )
        sink = CuratedDatasink(output, run_id, c.s3_endpoint_url, min_rows_per_write=c.rows_per_shard,
                               schema=dataset.LATENT_SCHEMA)
        write_to(ds, sink, cfg)
        results = sink.results
    wall = time.perf_counter() - start
    agg = aggregate(results)
    report = {"kind": "latents", "run_id": run_id, "output": output, "source": source, "source_digest": manifest.digest,
              "model": cfg.model.source, "dtype": c.cache_dtype, "inputs": agg["inputs"], "wall_s": round(wall, 3),
              "images_per_s": round(agg["inputs"] / wall, 2) if wall > 0 else None}
    # holdout 0: the splits are the source's (already balanced); publish must not move rows.
    sources = {n: {"kind": v.get("kind"), "repeats": v.get("repeats", 1.0),
                   **({"weight": v["weight"]} if v.get("weight") is not None else {})}
               for n, v in (manifest.sources or {}).items()}
    return publish(store, output, run_id, agg, 0.0, report, sources=sources)  # the mixture carries over
