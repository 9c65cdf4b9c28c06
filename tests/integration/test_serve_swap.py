"""Hot swap: the alias moves under load, the app switches versions with zero failed requests.

A registered model of its own (``terminus-swap``) keeps the session's champion untouched.
"""

from __future__ import annotations

import asyncio
import base64
import io
import time

import httpx
import mlflow
import numpy as np
import pytest
from PIL import Image

from components.config import InferenceConfig
from components.registry.model import ModelUriError, log_pipeline_model
from tests.fixtures.processes import REPO, free_port

NAME = "terminus-swap"
PROBE = {"prompt": "a probe", "size": "64x64", "seed": 11, "steps": 2}


def register(pipeline_dir, experiment_id) -> str:
    with mlflow.start_run(experiment_id=experiment_id):
        version = str(log_pipeline_model(pipeline_dir, NAME, InferenceConfig()).registered_model_version)
    mlflow.MlflowClient().set_registered_model_alias(NAME, "champion", version)
    return version


@pytest.fixture(scope="module")
def second_pipeline(registered_model, tmp_path_factory):
    """Same architecture, different weights (another seed), so a swap shows in the pixels."""
    from components.diffusion.sdxl import build_tiny, save_pipeline

    cfg = registered_model.cfg
    tiny = cfg.model.tiny.model_copy(update={"seed": cfg.model.tiny.seed + 1})
    return save_pipeline(build_tiny(tiny), cfg.diffusion, tmp_path_factory.mktemp("v2") / "pipeline")


def test_holder_loads_then_follows_the_alias(registered_model, tmp_path):
    """The holder alone (no Ray): not ready before the first load, then ready; unknown names refused."""
    from deploy.holder import ModelHolder, NotReady

    mlflow.set_tracking_uri(registered_model.tracking_uri)
    mlflow.set_registry_uri(registered_model.tracking_uri)
    holder = ModelHolder(f"models:/{registered_model.name}@champion", tmp_path, registered_model.cfg.inference)
    assert not holder.ready
    with pytest.raises(NotReady):
        _ = holder.current
    assert holder.refresh() is True
    assert holder.ready and holder.current.version == registered_model.version
    assert holder.refresh() is False  # the alias did not move: nothing reloaded
    with pytest.raises(ModelUriError):
        ModelHolder("models:/missing@champion", tmp_path, registered_model.cfg.inference).refresh()
    with pytest.raises(ModelUriError):
        ModelHolder("runs:/abc/model", tmp_path, registered_model.cfg.inference)


def test_alias_move_under_load_fails_no_request(ray_local, registered_model, second_pipeline):
    from ray import serve

    from deploy.app import build_app

    mlflow.set_tracking_uri(registered_model.tracking_uri)
    mlflow.set_registry_uri(registered_model.tracking_uri)
    v1 = register(registered_model.pipeline_dir, registered_model.experiment_id)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app({
            "config": str(REPO / "flows/configs/tiny.yaml"),
            "model_uri": f"models:/{NAME}@champion",
            "overrides": [*registered_model.overrides, "serve.poll_alias_s=0.5", "serve.default_steps=2"],
        }), name="swap", route_prefix="/")
        before = httpx.post(f"{base}/v1/images/generations", json=PROBE, timeout=60)
        assert before.json()["model_version"] == v1

        results: list[tuple[int, int, str | None]] = []  # (worker, status, version)
        v2: list[str] = []

        async def worker(i: int, client: httpx.AsyncClient, stop: asyncio.Event):
            while not stop.is_set():
                r = await client.post("/v1/images/generations", json={"prompt": f"load {i}", "size": "64x64"})
                results.append((i, r.status_code, r.json().get("model_version") if r.status_code == 200 else None))

        async def run():
            stop = asyncio.Event()
            async with httpx.AsyncClient(base_url=base, timeout=60) as client:
                tasks = [asyncio.create_task(worker(i, client, stop)) for i in range(3)]
                await asyncio.sleep(1.0)
                v2.append(await asyncio.to_thread(register, second_pipeline, registered_model.experiment_id))
                deadline = time.monotonic() + 60
                while not any(v == v2[0] for _, _, v in results) and time.monotonic() < deadline:
                    await asyncio.sleep(0.2)
                await asyncio.sleep(1.0)  # keep the load on a little after the swap
                stop.set()
                await asyncio.gather(*tasks)

        asyncio.run(run())
        statuses = [s for _, s, _ in results]
        assert statuses.count(200) == len(statuses), f"failed requests during the swap: {statuses}"
        assert {v for _, _, v in results} == {v1, v2[0]}
        for i in range(3):  # per client, versions only move forward: the swap is atomic
            seen = [v for w, _, v in results if w == i]
            assert seen == sorted(seen, key=int), seen

        after = httpx.post(f"{base}/v1/images/generations", json=PROBE, timeout=60)
        assert after.json()["model_version"] == v2[0]
        assert httpx.get(f"{base}/healthz").json()["version"] == v2[0]
        pixels = [np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"])))).astype(int)
                  for r in (before, after)]
        assert np.abs(pixels[0] - pixels[1]).max() > 40  # new weights, same seed: a different image
    finally:
        serve.shutdown()


def test_not_ready_until_loaded(registered_model, tmp_path):
    """check_health fails and /healthz says 503 while no model is loaded; both turn ready once it is.

    The deployments' own methods, called on stand-ins for the replica state (no Serve needed)."""
    from types import SimpleNamespace

    from deploy.app import Ingress, Model
    from deploy.holder import ModelHolder

    mlflow.set_tracking_uri(registered_model.tracking_uri)
    mlflow.set_registry_uri(registered_model.tracking_uri)
    replica = SimpleNamespace(holder=ModelHolder(
        f"models:/{registered_model.name}@champion", tmp_path, registered_model.cfg.inference))
    with pytest.raises(RuntimeError, match="not loaded"):
        Model.func_or_class.check_health(replica)

    async def unavailable():
        raise TimeoutError  # what asyncio.wait_for raises while no model replica answers

    async def info():
        return Model.func_or_class.info(replica)

    ingress = SimpleNamespace(_info=unavailable, _retry_after=lambda s: {"Retry-After": "1"})
    r = asyncio.run(Ingress.func_or_class.healthz(ingress))
    assert r.status_code == 503 and r.headers["retry-after"] == "1"

    replica.holder.refresh()
    Model.func_or_class.check_health(replica)
    ingress._info = info
    r = asyncio.run(Ingress.func_or_class.healthz(ingress))
    assert r.status_code == 200 and b'"version":"%s"' % registered_model.version.encode() in r.body
