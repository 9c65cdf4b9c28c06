"""Serving benchmark for the harness: batched vs unbatched throughput, and Serve latency vs a direct call.

``benchmark_serving(cfg)`` needs a registered model (``serve.model_uri``, else
``models:/<tracking.registered_model>@champion``) and no Serve instance running: it starts Serve on
loopback, deploys the app twice (``serve.max_batch_size`` = 1, then the configured size) with one
model replica, drives each one request at a time and then with ``requests`` identical-shape requests
at ``concurrency``, and shuts Serve down. The direct reference runs what a replica runs for one
request (same loader, ``deploy.batching.serve_batch``) in a Ray task with the replica's resources (so
both see the same CPU threads or GPU), before and after Serve (the mean of both); Serve's overhead is
the unbatched deployment's serial p50 minus the direct p50 (HTTP proxy, the ingress, the hop to the model replica). Not
a test: figures depend on the machine.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import time
from dataclasses import replace
from typing import Any

import httpx
import mlflow
import numpy as np
import ray
import torch
from PIL import Image
from ray import serve

from components.cluster import SERVE_ENV, ray_session
from components.config import Config
from components.diffusion.request import GenerationRequest, GenerationResult
from components.registry.tracking import tracking_uri
from deploy.api import adapter_id, parse_params, to_request
from deploy.app import compose, render_result
from deploy.batching import serve_batch
from deploy.holder import ModelHolder

WARMUP = 8  # requests before timing: a new replica's first pipeline calls are slower


def _stats(latencies: list[float]) -> dict[str, float]:
    arr = np.asarray(latencies)
    return {"p50_s": float(np.percentile(arr, 50)), "p99_s": float(np.percentile(arr, 99)),
            "mean_s": float(arr.mean())}


def _direct_latencies(config: dict, uri: str, tracking: str, cache_dir: str, size: int, steps: int,
                      count: int) -> dict[str, Any]:
    """Runs inside a Ray task: load through the same holder the replica uses and time what a replica
    runs for one request (``deploy.batching.serve_batch``: token check, pipeline, PNG encoding)."""
    cfg = Config.model_validate(config)
    mlflow.set_tracking_uri(tracking)
    mlflow.set_registry_uri(tracking)
    holder = ModelHolder(uri, cache_dir, cfg.inference)
    holder.refresh()
    loaded = holder.current
    req = GenerationRequest(prompt="benchmark", width=size, height=size, steps=steps, seed=0)
    for _ in range(WARMUP):
        serve_batch(loaded.name, loaded.version, loaded.pipelines, [req])
    latencies = []
    for i in range(count):
        start = time.perf_counter()
        serve_batch(loaded.name, loaded.version, loaded.pipelines, [replace(req, seed=i)])
        latencies.append(time.perf_counter() - start)
    return {**_stats(latencies), "count": count, "version": loaded.version, "device": str(loaded.pipelines.device)}


def _environment(names: list[str]) -> dict[str, str | None]:
    """Runs in a Ray worker: these variables as the cluster's processes see them."""
    return {name: os.environ.get(name) for name in names}


async def _drive_get(base: str, path: str, count: int) -> dict[str, Any]:
    """``count`` GETs of ``path``, one at a time: the latency of a route that generates nothing."""
    latencies: list[float] = []
    async with httpx.AsyncClient(base_url=base, timeout=60) as c:
        for _ in range(WARMUP):
            await c.get(path)
        for _ in range(count):
            start = time.perf_counter()
            r = await c.get(path)
            latencies.append(time.perf_counter() - start)
            r.raise_for_status()
    return {**_stats(latencies), "count": count, "path": path}


def _encoding_s(size: int, count: int = 50) -> dict[str, float]:
    """Median seconds the ingress spends on a request's own bytes, outside any hop: parsing the JSON
    body into a request, and rendering a result (one PNG of ``size`` px, base64, JSON)."""
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
    result = GenerationResult(images=[buf.getvalue()], seed=0, name="bench", version="1", batch_size=1)
    cfg = Config()
    body = json.dumps({"prompt": "benchmark", "size": f"{size}x{size}", "steps": 4}).encode()
    parse, render = [], []
    for _ in range(count):
        start = time.perf_counter()
        params = parse_params(json.loads(body))
        adapter_id(params.model, None, "bench")  # the ingress routes every request (base or adapter)
        to_request(params, cfg)
        parse.append(time.perf_counter() - start)
        start = time.perf_counter()
        render_result(result)
        render.append(time.perf_counter() - start)
    return {"parse_s": float(np.median(parse)), "render_s": float(np.median(render)), "png_bytes": len(buf.getvalue())}


def server_timing(header: str | None) -> dict[str, float]:
    """``Server-Timing: ingress;dur=12.3, model;dur=...`` -> {"ingress": 0.0123, ...} in seconds."""
    out: dict[str, float] = {}
    for entry in (header or "").split(","):
        name, _, params = entry.strip().partition(";")
        for param in params.split(";"):
            key, _, value = param.strip().partition("=")
            if key == "dur" and name:
                out[name] = float(value) / 1e3
    return out


def _paired(latencies: list[float], timings: list[dict[str, float]]) -> dict[str, float]:
    """Medians of each request's own split (HTTP latency against the ``Server-Timing`` the same request brought back):
    client + HTTP proxy (latency - ingress), the ingress -> model hop and back (ingress - model), the model
    deployment's batch queue and worker thread (model - work), and Serve's whole cost for it (latency - work).
    Paired per request, so a change of the machine's load between two runs does not enter it."""
    rows = [(lat, t) for lat, t in zip(latencies, timings, strict=True) if {"ingress", "model", "work"} <= set(t)]
    if not rows:
        return {}
    med = lambda xs: float(np.median(xs))  # noqa: E731
    return {
        "overhead_s": med([lat - t["work"] for lat, t in rows]),
        "client_and_proxy_s": med([lat - t["ingress"] for lat, t in rows]),
        "ingress_to_model_hop_s": med([t["ingress"] - t["model"] for lat, t in rows]),
        "model_queue_and_thread_s": med([t["model"] - t["work"] for lat, t in rows]),
        "work_s": med([t["work"] for lat, t in rows]),
        "count": len(rows),
    }


async def _drive(base: str, body: dict, count: int, concurrency: int) -> dict[str, Any]:
    """``count`` requests from ``concurrency`` closed-loop clients; throughput, latency, batch sizes, and (one at a
    time) each request's own split of where its time went (``Server-Timing``)."""
    latencies: list[float] = []
    timings: list[dict[str, float]] = []
    batch_sizes: list[int] = []
    errors = 0
    first_error: list[str] = []
    remaining = iter(range(count))

    async def client(c: httpx.AsyncClient):
        nonlocal errors
        for i in remaining:
            start = time.perf_counter()
            r = await c.post("/v1/images/generations", json={**body, "seed": i})
            latencies.append(time.perf_counter() - start)
            timings.append(server_timing(r.headers.get("server-timing")))
            if r.status_code != 200:
                errors += 1
                first_error.append(f"{r.status_code} {r.text[:300]}")
            else:
                batch_sizes.append(int(r.headers.get("x-batch-size", 1)))

    async with httpx.AsyncClient(base_url=base, timeout=600) as c:
        start = time.perf_counter()
        await asyncio.gather(*(client(c) for _ in range(concurrency)))
        wall = time.perf_counter() - start
    if errors:  # a benchmark of error responses measures nothing
        raise RuntimeError(f"{errors} of {count} requests failed, the first: {first_error[0]}")
    out = {"count": count, "throughput_rps": count / wall, "wall_s": wall, "errors": errors,
           "mean_batch_size": float(np.mean(batch_sizes)) if batch_sizes else 0.0, **_stats(latencies)}
    if concurrency == 1:  # one at a time, the split is Serve's alone (no request waits for another)
        out["paired"] = _paired(latencies, timings)
    return out


def benchmark_serving(cfg: Config, *, requests: int = 32, concurrency: int = 8, size: int = 64, steps: int = 4,
                      port: int | None = None) -> dict[str, Any]:
    """Measure serving on this machine; returns a flat-ish dict of figures (seconds, requests/s)."""
    uri = cfg.serve.model_uri or f"models:/{cfg.tracking.registered_model}@champion"
    resources = {"num_cpus": 1, "num_gpus": 1 if torch.cuda.is_available() else 0}
    port = port or cfg.serve.port
    base = f"http://{cfg.serve.host}:{port}"
    body = {"prompt": "benchmark", "size": f"{size}x{size}", "steps": steps}
    out: dict[str, Any] = {"model_uri": uri, "size": size, "steps": steps, "requests": requests,
                           "concurrency": concurrency, "resources": resources}
    with ray_session(serve_latency=True):
        # Serve's settings as Ray's own processes have them (components/cluster.py SERVE_ENV; None: Ray's default)
        out["serve_env"] = ray.get(ray.remote(_environment).options(num_cpus=0).remote(list(SERVE_ENV)))
        direct = ray.remote(_direct_latencies).options(**resources)
        direct_args = (cfg.model_dump(mode="json"), uri, tracking_uri(cfg), str(cfg.state_path("cache", "serve")),
                       size, steps, requests)
        out["direct_before"] = ray.get(direct.remote(*direct_args))
        serve.start(http_options={"host": cfg.serve.host, "port": port})
        try:
            for label, batch in (("unbatched", 1), ("batched", cfg.serve.max_batch_size)):
                variant = cfg.model_copy(update={"serve": cfg.serve.model_copy(update={
                    "max_batch_size": batch, "max_steps": max(cfg.serve.max_steps, steps), "api_key_env": None,
                    "max_side": max(cfg.serve.max_side, size), "min_side": min(cfg.serve.min_side, size),
                })})
                options = {"num_replicas": 1, "max_ongoing_requests": max(concurrency, batch),
                           "max_queued_requests": -1, "ray_actor_options": resources}
                serve.run(compose(variant, uri, model_options=options), name="bench", route_prefix="/")
                asyncio.run(_drive(base, body, WARMUP, 1))
                # One request at a time: Serve end to end against the direct call. Unbatched, that
                # difference is Serve's own cost; batched, a lone request also waits batch_wait_timeout_s.
                out[f"serial_{label}"] = asyncio.run(_drive(base, body, requests, 1))
                if label == "unbatched":  # client, HTTP proxy and ingress, without a model call
                    out["healthz"] = asyncio.run(_drive_get(base, "/healthz", requests))
                out[label] = asyncio.run(_drive(base, body, requests, concurrency))
                out[label]["max_batch_size"] = batch
        finally:
            serve.shutdown()
        # A-B-A: the direct reference again after Serve, so that a change of the machine's load in between shows
        # (``direct_drift``) and the reference is the mean of both.
        out["direct_after"] = ray.get(direct.remote(*direct_args))
    before, after = out["direct_before"], out["direct_after"]
    out["direct"] = {**before, "p50_s": (before["p50_s"] + after["p50_s"]) / 2,
                     "p99_s": (before["p99_s"] + after["p99_s"]) / 2,
                     "mean_s": (before["mean_s"] + after["mean_s"]) / 2}
    out["direct_drift"] = after["p50_s"] / before["p50_s"] - 1
    out["batching_speedup"] = out["batched"]["throughput_rps"] / out["unbatched"]["throughput_rps"]
    out["serve_overhead_p50_s"] = out["serial_unbatched"]["p50_s"] - out["direct"]["p50_s"]
    out["encoding"] = _encoding_s(size)
    # Where the overhead goes, request by request (``Server-Timing``, see ``_paired``); the ingress's own parse and
    # render (timed in-process) are part of the ingress -> model figure.
    paired = out["serial_unbatched"].get("paired", {})
    out["overhead_breakdown_s"] = {k: paired[k] for k in (
        "client_and_proxy_s", "ingress_to_model_hop_s", "model_queue_and_thread_s") if k in paired}
    if paired:
        out["serve_overhead_paired_s"] = paired["overhead_s"]
        out["replica_work_p50_s"] = paired["work_s"]
    out["batch_wait_timeout_s"] = cfg.serve.batch_wait_timeout_s
    return out
