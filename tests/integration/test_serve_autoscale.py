"""Autoscaling shown on loopback: a bounded load takes the model deployment from 1 to 2 replicas, and
it returns to 1 once the load stops. Short delays here; deploy/serve.yaml has the production ones."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from ray import serve

from tests.fixtures.servers import serve_app

APP = "autoscale"
LOAD_BUDGET_S = 90  # the load stops by itself after this (or MAX_REQUESTS) even if no scale-up was seen
MAX_REQUESTS = 1000
DOWN_BUDGET_S = 60


def running_replicas() -> int:
    app = serve.status().applications.get(APP)
    if app is None or "Model" not in app.deployments:
        return 0
    return int(app.deployments["Model"].replica_states.get("RUNNING", 0))


@pytest.mark.slow
def test_scales_up_under_load_and_back_down(ray_local, registered_model):
    autoscaling = {
        "min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1,
        "upscale_delay_s": 0.5, "downscale_delay_s": 2, "metrics_interval_s": 0.5, "look_back_period_s": 1.5,
    }
    with serve_app(APP, {
        "overrides": [*registered_model.overrides, "serve.default_steps=4", "serve.max_batch_size=1"],
        "model_options": {"autoscaling_config": autoscaling, "max_ongoing_requests": 2,
                          "max_queued_requests": -1, "graceful_shutdown_timeout_s": 5},
    }) as base:
        assert running_replicas() == 1

        statuses: list[int] = []
        timeline: list[tuple[float, int]] = []

        async def worker(client: httpx.AsyncClient, stop: asyncio.Event):
            while not stop.is_set() and len(statuses) < MAX_REQUESTS:
                r = await client.post("/v1/images/generations", json={"prompt": "load", "size": "64x64"})
                statuses.append(r.status_code)

        async def load_until_two_replicas():
            stop = asyncio.Event()
            async with httpx.AsyncClient(base_url=base, timeout=60) as client:
                tasks = [asyncio.create_task(worker(client, stop)) for _ in range(6)]
                start = time.monotonic()
                while time.monotonic() - start < LOAD_BUDGET_S:
                    n = await asyncio.to_thread(running_replicas)
                    timeline.append((time.monotonic() - start, n))
                    if n == 2:
                        break
                    await asyncio.sleep(0.5)
                stop.set()
                await asyncio.gather(*tasks)

        asyncio.run(load_until_two_replicas())
        assert max(n for _, n in timeline) == 2, f"never scaled up: {timeline[-5:]}"
        assert statuses and set(statuses) == {200}, f"requests failed under load: {sorted(set(statuses))}"

        deadline = time.monotonic() + DOWN_BUDGET_S
        while running_replicas() != 1 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert running_replicas() == 1, "did not scale back down to 1 replica after the load stopped"
        print(f"scale-up after {timeline[-1][0]:.1f} s of load ({len(statuses)} requests); "
              f"back to 1 replica {DOWN_BUDGET_S - (deadline - time.monotonic()):.1f} s after it stopped")
        assert httpx.get(f"{base}/healthz", timeout=10).status_code == 200
