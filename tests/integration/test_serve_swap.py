"""Hot swap: the alias moves under load, the app switches versions with zero failed requests.

A registered model of its own (``terminus-swap``) keeps the session's champion untouched.
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import time
from types import SimpleNamespace

import httpx
import mlflow
import numpy as np
import pytest
from PIL import Image

from components.config import InferenceConfig
from components.diffusion.request import GenerationRequest
from components.diffusion.sdxl import save_pipeline
from components.diffusion.tiny import build_tiny
from components.registry.model import ModelUriError, log_pipeline_model
from deploy.app import Ingress, Model, Readiness
from deploy.holder import LoadFailed, ModelHolder, NotReady
from deploy.served_adapters import ReplicaAdapters
from tests.fixtures.servers import serve_app

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
    cfg = registered_model.cfg
    tiny = cfg.model.tiny.model_copy(update={"seed": cfg.model.tiny.seed + 1})
    return save_pipeline(build_tiny(tiny), cfg.diffusion, tmp_path_factory.mktemp("v2") / "pipeline")


def test_holder_loads_then_follows_the_alias(registered_model, tmp_path):
    """The holder alone (no Ray): not ready before the first load, then ready; unknown names refused."""
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


def test_a_compiling_holder_warms_up_before_it_serves_and_draws_the_same_images(registered_model, tmp_path, caplog):
    """serve.compile: the version's UNet is compiled and generated once before ``current`` hands it out;
    its images equal the eager holder's (aot_eager generates no code of its own)."""
    mlflow.set_tracking_uri(registered_model.tracking_uri)
    mlflow.set_registry_uri(registered_model.tracking_uri)
    uri, inference = f"models:/{registered_model.name}/{registered_model.version}", registered_model.cfg.inference
    warmup = GenerationRequest(prompt="warm-up", width=64, height=64, steps=2, seed=0)
    with caplog.at_level(logging.INFO, logger="deploy.holder"):
        compiled = ModelHolder(uri, tmp_path / "a", inference, compile_backend="aot_eager", warmup=warmup)
        compiled.refresh()
    assert any("warmed up" in r.getMessage() for r in caplog.records)
    assert compiled.current.pipelines.t2i.unet._compiled_call_impl is not None
    eager = ModelHolder(uri, tmp_path / "b", inference)
    eager.refresh()
    assert eager.current.pipelines.t2i.unet._compiled_call_impl is None
    req = GenerationRequest(prompt="a lighthouse at dusk", width=64, height=64, steps=2, seed=3)
    images = [np.asarray(h.current.pipelines.generate_group([req], output_type="np")[0][0]) for h in (compiled, eager)]
    np.testing.assert_allclose(images[0], images[1], atol=1e-4)


def test_alias_move_under_load_fails_no_request(ray_local, registered_model, second_pipeline):
    mlflow.set_tracking_uri(registered_model.tracking_uri)
    mlflow.set_registry_uri(registered_model.tracking_uri)
    v1 = register(registered_model.pipeline_dir, registered_model.experiment_id)
    with serve_app("swap", {
        "model_uri": f"models:/{NAME}@champion",
        "overrides": [*registered_model.overrides, "serve.poll_alias_s=0.5", "serve.default_steps=2"],
    }) as base:
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


def test_not_ready_until_loaded(registered_model, tmp_path):
    """check_health fails and /healthz says 503 while no model is loaded; both turn ready once it is.

    The deployments' own methods, called on stand-ins for the replica state (no Serve needed)."""
    mlflow.set_tracking_uri(registered_model.tracking_uri)
    mlflow.set_registry_uri(registered_model.tracking_uri)
    replica = SimpleNamespace(holder=ModelHolder(
        f"models:/{registered_model.name}@champion", tmp_path, registered_model.cfg.inference),
        adapters=ReplicaAdapters(tmp_path, 1.0))
    with pytest.raises(RuntimeError, match="not loaded"):
        Model.func_or_class.check_health(replica)

    async def unavailable():
        raise TimeoutError  # what asyncio.wait_for raises while no model replica answers

    async def info():
        return Model.func_or_class.info(replica)

    ingress = SimpleNamespace(readiness=Readiness(unavailable), _retry_after=lambda s: {"Retry-After": "1"})
    r = asyncio.run(Ingress.func_or_class.healthz(ingress))
    assert r.status_code == 503 and r.headers["retry-after"] == "1"

    replica.holder.refresh()
    Model.func_or_class.check_health(replica)
    ingress.readiness = Readiness(info)
    r = asyncio.run(Ingress.func_or_class.healthz(ingress))
    assert r.status_code == 200 and b'"version":"%s"' % registered_model.version.encode() in r.body


# --- a bad alias target ------------------------------------------------------------------------------


@pytest.fixture
def holder_registry(registered_model, tmp_path):
    """A registered model of its own with two good versions (the tiny pipeline, registered as training
    does) and a broken one (its artifacts are an empty folder, as a deleted or half-uploaded version)."""
    mlflow.set_tracking_uri(registered_model.tracking_uri)
    mlflow.set_registry_uri(registered_model.tracking_uri)
    name = f"terminus-holder-{tmp_path.name[-12:].replace('_', '-')}"
    versions = []
    for _ in range(2):
        with mlflow.start_run(experiment_id=registered_model.experiment_id):
            info = log_pipeline_model(registered_model.pipeline_dir, name, InferenceConfig())
        versions.append(str(info.registered_model_version))
    empty = tmp_path / "empty-artifacts"
    empty.mkdir()
    client = mlflow.MlflowClient()
    bad = str(client.create_model_version(name, empty.as_uri()).version)
    client.set_registered_model_alias(name, "champion", versions[0])
    return SimpleNamespace(name=name, good=versions[0], good2=versions[1], bad=bad, client=client,
                           inference=registered_model.cfg.inference)


def _counting_holder(uri, cache):
    class Counting(ModelHolder):
        loads: list[str] = []

        def load(self, name, version):
            self.loads.append(str(version))
            return super().load(name, version)

    holder = Counting(uri, cache, InferenceConfig())
    holder.loads = []
    return holder


def test_a_bad_alias_target_is_backed_off_and_the_last_good_version_keeps_serving(holder_registry, tmp_path):
    """The alias moves to a version that cannot be loaded: the replica keeps serving the good version, the
    bad one is retried with exponential backoff (period x 2**failures) rather than every period, and a fix of
    the alias is still picked up at the normal pace."""
    r = holder_registry
    holder = _counting_holder(f"models:/{r.name}@champion", tmp_path / "cache")
    assert holder.refresh() and holder.current.version == r.good
    r.client.set_registered_model_alias(r.name, "champion", r.bad)
    period, window = 0.05, 3.0
    holder.start_polling(period)
    try:
        time.sleep(window)  # an observation window: the number of tries in it is the measure
        tries = holder.loads.count(r.bad)
        assert holder.current.version == r.good
        # Backoff after each failure: 0.1, 0.2, 0.4, 0.8, 1.6 s...: at most 6 tries in 3 s (a try every
        # period would be ~60).
        assert 2 <= tries <= 6, holder.loads
        assert holder.bad[r.bad].failures == tries
        r.client.set_registered_model_alias(r.name, "champion", r.good2)
        deadline = time.monotonic() + 60
        while holder.current.version != r.good2:
            assert time.monotonic() < deadline, "the fixed alias was not picked up"
            time.sleep(period)
    finally:
        holder.stop()


def test_a_new_replica_starts_on_the_last_good_version(holder_registry, tmp_path):
    """A replica that starts while the alias names a broken version (a scale-up, a restart) serves the
    last version its node loaded well, else the alias's ``previous``; before, its constructor raised and
    the deployment had no replica. With neither, there is nothing to serve, and it still raises."""
    r = holder_registry
    uri = f"models:/{r.name}@champion"
    ModelHolder(uri, tmp_path / "node", r.inference).start()  # a replica that served the good version here
    r.client.set_registered_model_alias(r.name, "champion", r.bad)

    scaled_up = ModelHolder(uri, tmp_path / "node", r.inference)
    scaled_up.start()
    assert scaled_up.ready and scaled_up.current.version == r.good and r.bad in scaled_up.bad

    fresh_node = ModelHolder(uri, tmp_path / "fresh", r.inference)
    with pytest.raises(LoadFailed, match=f"version {r.bad} failed to load"):
        fresh_node.start()  # no record on this node, no previous alias: nothing to serve
    r.client.set_registered_model_alias(r.name, "previous", r.good2)  # what flows/promote.py leaves
    fresh_node = ModelHolder(uri, tmp_path / "fresh", r.inference)
    fresh_node.start()
    assert fresh_node.current.version == r.good2
