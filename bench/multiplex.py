"""Adapters served many per replica (Ray Serve model multiplexing) against one dedicated replica per adapter.

``benchmark_multiplex(cfg)`` needs the registry ``bench.report.bench_registry`` makes (a base at ``@champion``) and
no Serve instance running. It registers ``adapters`` LoRAs of that base (random weights of the rank the preset
trains: serving cost does not depend on what an adapter learned), starts Serve on loopback, and measures two
layouts of the same app (``deploy.app``):

- multiplexed: one model replica; every request names one of the adapters in turn (the OpenAI ``model`` field),
  so consecutive requests switch the active adapter and the replica holds all of them in its LRU;
- dedicated: one app (one model replica) per adapter; each app only ever sees its own adapter.

Both are driven with the same closed-loop clients; latency (p50, p99), throughput, and the peak resident memory of
the model replicas (``ru_maxrss``; on a GPU also ``torch.cuda.max_memory_allocated``) are reported: the multiplexed
layout's one replica against the sum over the dedicated ones. Not a test: figures depend on the machine.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import httpx
import mlflow
import numpy as np
import torch
from diffusers import UNet2DConditionModel
from ray import serve

from bench.serving import WARMUP, _stats
from components.cluster import ray_session
from components.config import Config
from components.diffusion.adapters import AdapterWeights, adapter_state, add_adapter, peft_config, save_adapter
from components.registry.adapter_versions import log_adapter, version_weights_sha256, write_adapter_folder
from components.registry.model import fetch_model, resolve_version
from components.registry.tracking import setup_tracking
from deploy.app import compose


def register_bench_adapters(cfg: Config, root: Path, count: int) -> list[str]:
    """``count`` LoRAs of the ``@champion`` base of ``cfg``'s registry, each at its own ``@champion``; their names."""
    experiment = setup_tracking(cfg)
    name, version = resolve_version(cfg.serve.model_uri)
    base_dir = fetch_model(f"models:/{name}/{version}", root / "cache").pipeline_dir
    sha = version_weights_sha256(name, version, root / "cache")
    a = cfg.train.adapter
    names = []
    for i in range(count):
        unet = UNet2DConditionModel.from_pretrained(str(base_dir), subfolder="unet")
        config = peft_config("lora", a.rank, a.alpha, 0.0, a.target_modules)
        gen = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in add_adapter(unet, config):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
        folder = root / "adapters" / f"a{i}"
        weights = AdapterWeights(adapter_state(unet), config)
        save_adapter(folder, weights.state, config)
        write_adapter_folder(folder, weights, f"models:/{name}/{version}", sha,
                             json.loads((base_dir / "unet" / "config.json").read_text()))
        adapter_name = f"{name}-adapter-{i}"
        with mlflow.start_run(experiment_id=experiment):
            v = log_adapter(folder, adapter_name, cfg.inference, f"models:/{name}/{version}", sha)
        mlflow.MlflowClient().set_registered_model_alias(adapter_name, "champion", v)
        names.append(adapter_name)
    return names


async def _drive(base: str, bodies: list[dict], count: int, concurrency: int) -> dict[str, Any]:
    """``count`` requests from ``concurrency`` closed-loop clients; request ``i`` goes to ``bodies[i % n]`` (a
    (url, body) pair each)."""
    latencies: list[float] = []
    errors = 0
    remaining = iter(range(count))

    async def client(c: httpx.AsyncClient):
        nonlocal errors
        for i in remaining:
            url, body = bodies[i % len(bodies)]
            start = time.perf_counter()
            r = await c.post(url, json={**body, "seed": i})
            latencies.append(time.perf_counter() - start)
            errors += r.status_code != 200

    async with httpx.AsyncClient(base_url=base, timeout=600) as c:
        start = time.perf_counter()
        await asyncio.gather(*(client(c) for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return {"count": count, "throughput_rps": count / wall, "wall_s": wall, "errors": errors, **_stats(latencies)}


def _replica_memory(app: str) -> dict[str, int]:
    return serve.get_deployment_handle("Model", app_name=app).memory.remote().result()


def benchmark_multiplex(cfg: Config, root: Path, *, adapters: int = 2, requests: int = 16, concurrency: int = 4,
                        size: int = 64, steps: int = 4, port: int | None = None) -> dict[str, Any]:
    """Measure the two layouts on this machine (module docstring); a dict of figures (seconds, req/s, bytes)."""
    # Half a CPU per model replica and a quarter per ingress, on both sides: the dedicated layout's replicas must
    # all fit at once on a 2-CPU machine (and share one GPU where there is one).
    resources = {"num_cpus": 0.5, "num_gpus": 1 / max(adapters, 1) if torch.cuda.is_available() else 0}
    ingress = {"ray_actor_options": {"num_cpus": 0.25}}
    port = port or cfg.serve.port
    base = f"http://{cfg.serve.host}:{port}"
    body = {"prompt": "benchmark", "size": f"{size}x{size}", "steps": steps}
    variant = cfg.model_copy(update={"serve": cfg.serve.model_copy(update={
        "max_steps": max(cfg.serve.max_steps, steps), "api_key_env": None, "max_side": max(cfg.serve.max_side, size),
        "min_side": min(cfg.serve.min_side, size), "max_adapters_per_replica": max(adapters, 1),
    })})
    options = {"num_replicas": 1, "max_ongoing_requests": max(concurrency, cfg.serve.max_batch_size),
               "max_queued_requests": -1, "ray_actor_options": resources}
    out: dict[str, Any] = {"adapters": adapters, "size": size, "steps": steps, "requests": requests,
                           "concurrency": concurrency, "resources": resources, "rank": cfg.train.adapter.rank}
    with ray_session():
        start = time.perf_counter()
        names = register_bench_adapters(cfg, root, adapters)
        out["registry_setup_s"] = time.perf_counter() - start
        serve.start(http_options={"host": cfg.serve.host, "port": port})
        try:
            serve.run(compose(variant, cfg.serve.model_uri, model_options=options, ingress_options=ingress), name="mux",
                      route_prefix="/mux")
            bodies = [("/mux/v1/images/generations", {**body, "model": f"{n}@champion"}) for n in names]
            asyncio.run(_drive(base, bodies, WARMUP, 1))
            out["multiplexed"] = asyncio.run(_drive(base, bodies, requests, concurrency))
            out["multiplexed"]["memory"] = _replica_memory("mux")
            serve.delete("mux")
            dedicated = []
            for i, n in enumerate(names):
                serve.run(compose(variant, cfg.serve.model_uri, model_options=options, ingress_options=ingress),
                          name=f"own{i}", route_prefix=f"/own{i}")
                dedicated.append((f"/own{i}/v1/images/generations", {**body, "model": f"{n}@champion"}))
            asyncio.run(_drive(base, dedicated, WARMUP, 1))
            out["dedicated"] = asyncio.run(_drive(base, dedicated, requests, concurrency))
            memories = [_replica_memory(f"own{i}") for i in range(len(names))]
            out["dedicated"]["memory"] = {k: sum(m[k] for m in memories) for k in memories[0]}
        finally:
            serve.shutdown()
    m, d = out["multiplexed"], out["dedicated"]
    out["latency_ratio_p50"] = m["p50_s"] / d["p50_s"]
    out["memory_ratio"] = m["memory"]["peak_rss_bytes"] / d["memory"]["peak_rss_bytes"]
    out["errors"] = int(np.sum([m["errors"], d["errors"]]))
    return out
