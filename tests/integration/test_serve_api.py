"""The running Serve app over real HTTP (httpx on loopback): OpenAI-shaped requests, auth, errors,
edits, batching without mixing, and the 503 of a full queue. Serve starts once for the module."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import secrets
import socket
import time
from ipaddress import ip_address
from types import SimpleNamespace

import grpc
import httpx
import mlflow
import numpy as np
import openai
import psutil
import pytest
from PIL import Image
from ray._raylet import AuthenticationTokenLoader

from bench.serving import server_timing
from components.diffusion.adapters import ADAPTER_FILE, AdapterSlots, save_adapter
from components.diffusion.pipelines import build_pipelines
from components.diffusion.request import GenerationRequest
from components.diffusion.schedule import inference_scheduler
from components.registry.adapter_versions import log_adapter, version_weights_sha256, write_adapter_folder
from components.registry.model import diffusion_from_pipeline_dir, fetch_model, log_pipeline_model
from components.registry.promotion import promote, rollback
from tests.fixtures.servers import serve_app
from tests.unit.deploy.test_served_adapters import hostile_files
from tests.unit.diffusion.test_adapters import random_adapter

ENV = "TERMINUS_TEST_API_KEY"
TOKEN = "sk-test-" + secrets.token_hex(12)
AUTH = {"Authorization": f"Bearer {TOKEN}"}
RETRY_AFTER_S = 3  # the Model deployment's backpressure_config below; the 503 must carry it
TOLERANCE = 2  # see tests/unit/deploy/test_batching.py: batched float32 sums may move a pixel by one level

# What the OpenAI Python client (openai 1.x, `client.images.generate(...)`) puts on the wire.
OPENAI_HEADERS = {
    "Accept": "application/json",
    "Content-Type": "application/json",
    "User-Agent": "OpenAI/Python 1.109.1",
    "X-Stainless-Lang": "python",
    "X-Stainless-Package-Version": "1.109.1",
    "X-Stainless-OS": "Linux",
    "X-Stainless-Arch": "x64",
    "X-Stainless-Runtime": "CPython",
    "X-Stainless-Runtime-Version": "3.11.7",
    "X-Stainless-Async": "false",
    "x-stainless-retry-count": "0",
    "x-stainless-read-timeout": "600",
    **AUTH,
}


@pytest.fixture(scope="module")
def server(ray_local, registered_model):
    args = {
        "overrides": [
            *registered_model.overrides, f"serve.api_key_env={ENV}", "serve.default_steps=2",
            "serve.default_size=64", "serve.max_upload_bytes=200000", "serve.max_upload_pixels=262144",
            "serve.batch_wait_timeout_s=0.1", "serve.max_adapters_per_replica=2", "serve.poll_alias_s=0.5",
        ],
        "model_options": {"max_ongoing_requests": 2, "max_queued_requests": 2,
                          "backpressure_config": {"retry_after_s": RETRY_AFTER_S}},
        # The key reaches the ingress replica the way a deployment would get it: its own environment, with
        # the trailing newline of a Secret made with --from-file (clients send the key without it).
        "ingress_options": {"ray_actor_options": {"num_cpus": 0.5,
                                                  "runtime_env": {"env_vars": {ENV: TOKEN + "\n"}}}},
    }
    with serve_app("api", args) as base:
        yield base


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server, timeout=120) as c:
        yield c


def png(size=(64, 64), mode="RGB", color=(200, 40, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG")
    return buf.getvalue()


def images_of(response: httpx.Response) -> list[Image.Image]:
    assert response.status_code == 200, response.text[:300]
    return [Image.open(io.BytesIO(base64.b64decode(d["b64_json"]))) for d in response.json()["data"]]


def gen(client, **body) -> httpx.Response:
    return client.post("/v1/images/generations", json={"size": "64x64", **body}, headers=AUTH)


def test_healthz_is_open_and_ready_with_the_version(client, registered_model):
    r = client.get("/healthz")
    assert r.status_code == 200
    assert r.json() == {"status": "ready", "model": registered_model.name, "version": registered_model.version}


def test_health_probes_take_no_model_slots(server):
    """/healthz needs no key, so it must not spend the model's capacity (2 running + 2 queued here): a
    burst of anonymous probes all answer 200 from the ingress's cached readiness, and a paying request
    sent in the middle of the burst is served. Before, every probe was a model call: the burst filled
    the queue, and probes and the paying request were answered 503."""
    async def burst():
        async with httpx.AsyncClient(base_url=server, timeout=60) as c:
            probes = [c.get("/healthz") for _ in range(48)]
            paid = c.post("/v1/images/generations", json={"prompt": "a", "size": "64x64", "steps": 1}, headers=AUTH)
            return await asyncio.gather(paid, *probes)

    paid, *probes = asyncio.run(burst())
    assert sorted({r.status_code for r in probes}) == [200], [r.text[:100] for r in probes if r.status_code != 200][:3]
    assert paid.status_code == 200, paid.text[:300]


def test_openai_client_request(client, registered_model):
    """Body and headers exactly as the OpenAI Python client sends them (extras via extra_body)."""
    body = {"prompt": "a lighthouse at dusk", "model": registered_model.name, "n": 1,
            "response_format": "b64_json", "size": "64x64", "steps": 2, "seed": 3}
    r = client.post("/v1/images/generations", content=json.dumps(body).encode(), headers=OPENAI_HEADERS)
    assert r.status_code == 200, r.text[:300]
    data = r.json()
    assert isinstance(data["created"], int) and len(data["data"]) == 1
    assert data["model"] == registered_model.name and data["model_version"] == registered_model.version
    assert r.headers["x-model-version"] == f"{registered_model.name}/{registered_model.version}"
    raw = base64.b64decode(data["data"][0]["b64_json"])
    assert raw.startswith(b"\x89PNG\r\n\x1a\n")
    image = Image.open(io.BytesIO(raw))
    assert image.format == "PNG" and image.size == (64, 64)
    # Where the request's time went, nested: the ingress's route holds the model's answer, which holds its work.
    timing = server_timing(r.headers["server-timing"])
    assert timing.keys() == {"ingress", "model", "work"}
    assert timing["ingress"] >= timing["model"] >= timing["work"] > 0, timing


def test_the_openai_sdk_gets_each_output_format_and_its_usage(server, registered_model):
    """The current openai SDK, unchanged: each output format decodes as itself, ``size="auto"`` is the default
    size, ``usage`` parses; a transparent background and a size off the grid are 400s that say why."""
    sdk = openai.OpenAI(base_url=f"{server}/v1", api_key=TOKEN, max_retries=0)
    for fmt, pil in (("png", "PNG"), ("jpeg", "JPEG"), ("webp", "WEBP")):
        r = sdk.images.generate(prompt="a lighthouse at dusk", model=registered_model.name, size="auto",
                                output_format=fmt, output_compression=None if fmt == "png" else 80,
                                background="opaque", quality="auto", moderation="low", extra_body={"seed": 3})
        image = Image.open(io.BytesIO(base64.b64decode(r.data[0].b64_json)))
        assert (image.format, image.size, r.output_format) == (pil, (64, 64), fmt)  # serve.default_size=64 here
        assert r.usage.input_tokens == r.usage.input_tokens_details.text_tokens > 2
        assert r.usage.output_tokens == 8 * 8 and r.usage.total_tokens == r.usage.input_tokens + 64
    edit = sdk.images.edit(image=("image.png", png(), "image/png"), prompt="a window", size="64x64",
                           output_format="jpeg", extra_body={"strength": 0.5, "num_inference_steps": 2})
    assert Image.open(io.BytesIO(base64.b64decode(edit.data[0].b64_json))).format == "JPEG"
    assert edit.usage.input_tokens_details.image_tokens == 8 * 8
    with pytest.raises(openai.BadRequestError) as err:
        sdk.images.generate(prompt="a", background="transparent", output_format="png")
    assert err.value.status_code == 400 and "background" in err.value.message
    with pytest.raises(openai.BadRequestError) as err:
        sdk.images.generate(prompt="a", size="1000x1000")
    assert err.value.body["param"] == "size" and "multiple of 8 from 64 to 512" in err.value.message


def test_the_openai_sdk_streams_partial_images_then_the_completed_image(server, registered_model):
    """``stream=True, partial_images=2`` through the current openai SDK's own SSE parsing: two partial images
    (indices 0 then 1) and one completed event carrying the final image and its usage; ``n`` 2 streamed is a 400."""
    sdk = openai.OpenAI(base_url=f"{server}/v1", api_key=TOKEN, max_retries=0)
    events = list(sdk.images.generate(prompt="a lighthouse at dusk", model=registered_model.name, size="64x64",
                                      stream=True, partial_images=2, extra_body={"steps": 2, "seed": 3}))
    assert [e.type for e in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert [e.partial_image_index for e in events[:2]] == [0, 1]
    final = events[-1]
    image = Image.open(io.BytesIO(base64.b64decode(final.b64_json)))
    assert (image.format, image.size, final.size, final.output_format) == ("PNG", (64, 64), "64x64", "png")
    assert final.usage.output_tokens == 8 * 8 and final.usage.input_tokens > 2
    with pytest.raises(openai.BadRequestError) as err:
        sdk.images.generate(prompt="a", size="64x64", n=2, stream=True)
    assert err.value.body["param"] == "n"


def first_event_then_close(server: str, body: dict) -> bytes:
    """A raw HTTP/1.1 client that sends a streamed request, reads up to the end of its first event, and closes."""
    host, port = server.removeprefix("http://").rsplit(":", 1)
    payload = json.dumps(body).encode()
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: " + host.encode() + b"\r\nAuthorization: "
                     + AUTH["Authorization"].encode() + b"\r\nContent-Type: application/json\r\nContent-Length: "
                     + str(len(payload)).encode() + b"\r\n\r\n" + payload)
        received = b""
        while b"\n\n" not in received.partition(b"\r\n\r\n")[2]:
            chunk = sock.recv(65536)
            assert chunk, received[:300]
            received += chunk
    return received


def test_a_client_that_disconnects_mid_stream_stops_its_generation(client, server):
    """A stream read to its end gives the full generation's time; then two clients (the model's 2 running slots)
    read their first event and hang up, and three more do so in a row (past the 2 running + 2 queued). Were a
    hung-up generation to run on, the request after them would wait out most of a full generation behind it (or
    be a 503): it must be answered in under half of one."""
    body = {"prompt": "a red cat", "size": "512x512", "steps": 50, "seed": 1, "stream": True, "partial_images": 3}
    since = time.perf_counter()
    with client.stream("POST", "/v1/images/generations", json=body, headers=AUTH) as whole:
        events = [line for line in whole.iter_lines() if line.startswith("event: ")]
    full_s = time.perf_counter() - since
    assert events == ["event: image_generation.partial_image"] * 3 + ["event: image_generation.completed"]
    for _ in range(5):
        head = first_event_then_close(server, body)
        assert head.startswith(b"HTTP/1.1 200") and b"text/event-stream" in head, head[:300]
        assert b"event: image_generation.partial_image" in head
    since = time.perf_counter()
    assert images_of(gen(client, prompt="a cat", steps=2))[0].size == (64, 64)
    assert time.perf_counter() - since < full_s / 2, (time.perf_counter() - since, full_s)


def test_bearer_auth(client):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"},
                    {"Authorization": TOKEN}):
        r = client.post("/v1/images/generations", json={"prompt": "a"}, headers=headers)
        assert r.status_code == 401, headers
        assert r.headers["www-authenticate"] == "Bearer"
        assert r.json()["error"]["code"] == "invalid_api_key"
    assert client.get("/v1/models").status_code == 401
    assert client.get("/healthz").status_code == 200  # probes carry no key


def test_only_rays_authenticated_grpc_listens_beyond_loopback(server):
    """The HTTP front listens on 127.0.0.1 alone. The replicas' ports open to every interface are Ray's gRPC
    servers (README, "Security notes"): their request method refuses a call without Ray's token, or with a wrong
    one, and takes one with it (what the call then does with an empty request does not matter here)."""
    port = int(server.rsplit(":", 1)[1])
    listening = [c for c in psutil.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN and c.pid]
    assert {c.laddr.ip for c in listening if c.laddr.port == port} == {"127.0.0.1"}
    replicas = {p.pid for p in psutil.process_iter(["name"]) if p.info["name"].startswith("ray::ServeReplica:api:")}
    open_ports = sorted(c.laddr.port for c in listening if c.pid in replicas and not ip_address(c.laddr.ip).is_loopback)
    token = tuple(AuthenticationTokenLoader.instance().get_token_for_http_header().items())
    answered = []
    for open_port in open_ports:
        with grpc.insecure_channel(f"127.0.0.1:{open_port}") as channel:
            call = channel.unary_unary("/ray.serve.ASGIService/HandleRequest", request_serializer=bytes,
                                       response_deserializer=bytes)
            codes = []
            for metadata in ((), (("authorization", "Bearer not-the-token"),), token):
                try:
                    call(b"", timeout=30, metadata=metadata)
                    codes.append(grpc.StatusCode.OK)
                except grpc.RpcError as err:
                    codes.append(err.code())
        if codes[0] is grpc.StatusCode.UNIMPLEMENTED:  # another of Ray's servers (the worker's own)
            continue
        assert codes[:2] == [grpc.StatusCode.UNAUTHENTICATED] * 2 and codes[2] is not grpc.StatusCode.UNAUTHENTICATED
        answered.append(open_port)
    assert answered, f"no Serve replica port answered among {open_ports}"


def test_models_lists_the_served_version(client, registered_model):
    r = client.get("/v1/models", headers=AUTH)
    assert r.status_code == 200
    (entry,) = [d for d in r.json()["data"] if d["kind"] == "base"]
    assert entry["id"] == registered_model.name and entry["version"] == registered_model.version
    assert entry["object"] == "model" and entry["uri"] == f"models:/{registered_model.name}@champion"


def test_seeds_reproduce_and_n_gives_distinct_images(client):
    a, b = images_of(gen(client, prompt="a cat", seed=5, n=2)), images_of(gen(client, prompt="a cat", seed=5, n=2))
    assert [np.asarray(x).tolist() for x in a] == [np.asarray(x).tolist() for x in b]
    assert np.abs(np.asarray(a[0]).astype(int) - np.asarray(a[1]).astype(int)).max() > 20
    assert [d["seed"] for d in gen(client, prompt="a cat", seed=5, n=2).json()["data"]] == [5, 6]


def _edit(client, files, data, headers=AUTH):
    return client.post("/v1/images/edits", files=files, data=data, headers=headers)


def test_edits_inpaint_and_image_to_image(client, registered_model):
    mask = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (16, 16, 48, 48))  # OpenAI: transparent = edit here
    buf = io.BytesIO()
    mask.save(buf, format="PNG")
    files = {"image": ("image.png", png(), "image/png"), "mask": ("mask.png", buf.getvalue(), "image/png")}
    form = {"prompt": "a window", "n": "1", "size": "64x64", "response_format": "b64_json", "seed": "4"}
    inpaint = _edit(client, files, form)
    assert images_of(inpaint)[0].size == (64, 64)
    assert inpaint.json()["model_version"] == registered_model.version
    assert images_of(_edit(client, files, form))[0].tobytes() == images_of(inpaint)[0].tobytes()
    # No mask: image-to-image; `size` resizes the input (LANCZOS) and so the output.
    i2i = _edit(client, {"image": ("image.png", png((128, 128)), "image/png")},
                {"prompt": "a window", "strength": "0.5", "size": "64x64", "seed": "4"})
    assert images_of(i2i)[0].size == (64, 64)


BAD_GENERATIONS = {
    "size-not-multiple-of-8": {"prompt": "a", "size": "60x64"},
    "size-above-max-side": {"prompt": "a", "size": "1024x1024"},  # tiny preset: max_side 512
    "size-garbage": {"prompt": "a", "size": "large"},
    "n-above-limit": {"prompt": "a", "n": 99},
    "steps-above-limit": {"prompt": "a", "steps": 1000},
    "prompt-too-many-chars": {"prompt": "a" * 5000},
    "prompt-too-many-tokens": {"prompt": "a very long prompt " * 8},  # > 77 tokens; refused by the model replica
    "negative-too-many-tokens": {"prompt": "a", "negative_prompt": "blurry " * 20},
    "url-format": {"prompt": "a", "response_format": "url"},
    "unknown-model": {"prompt": "a", "model": "dall-e-3"},
    "unknown-field": {"prompt": "a", "sampler": "euler"},
    "missing-prompt": {"n": 1},
    "wrong-type": {"prompt": ["a"]},
    "strength-without-image": {"prompt": "a", "strength": 0.5},
    "not-an-object": [1, 2],
}


@pytest.mark.parametrize("body", BAD_GENERATIONS.values(), ids=BAD_GENERATIONS.keys())
def test_client_mistakes_get_4xx_json(client, body):
    r = client.post("/v1/images/generations", json=body, headers=AUTH)
    assert 400 <= r.status_code < 500, r.text[:300]
    error = r.json()["error"]
    assert error["message"] and error["type"]


def test_more_client_mistakes_get_4xx_json(client):
    big = secrets.token_bytes(250_000)  # over serve.max_upload_bytes (200 kB here)
    bomb = png((1024, 1024))  # small file, but more pixels than serve.max_upload_pixels (512 x 512 here)
    cases = [
        (client.post("/v1/images/generations", content=b"{not json",
                     headers={**AUTH, "content-type": "application/json"}), 400),
        (client.post("/v1/images/generations", content=big, headers=AUTH), 413),
        (_edit(client, {"image": ("a.png", big, "image/png")}, {"prompt": "a"}), 413),
        (_edit(client, {"image": ("a.png", b"\x89PNG garbage", "image/png")}, {"prompt": "a"}), 400),
        (_edit(client, {"image": ("a.png", bomb, "image/png")}, {"prompt": "a"}), 400),
        (_edit(client, {"image": ("a.png", png(), "image/png"), "mask": ("m.png", png((32, 32)), "image/png")},
               {"prompt": "a"}), 400),
        (_edit(client, {"mask": ("m.png", png(), "image/png")}, {"prompt": "a"}), 400),
        (_edit(client, {"image": ("a.png", png((100, 60)), "image/png")}, {"prompt": "a"}), 400),
        (_edit(client, {"image": ("a.png", png(), "image/png")}, {"prompt": "a", "steps": "2", "strength": "0.2"}),
         400),  # int(2 x 0.2) = 0 denoising steps: refused by the model replica, not a pipeline error
        (client.post("/v1/images/edits", json={"prompt": "a"}, headers=AUTH), 400),
        (client.get("/v1/images/generations", headers=AUTH), 405),
        (client.get("/v1/nothing", headers=AUTH), 404),
    ]
    for i, (r, status) in enumerate(cases):
        assert r.status_code == status, (i, r.text[:300])
        assert r.json()["error"]["message"], i


def test_concurrent_requests_batch_without_mixing(server):
    a = {"prompt": "a red cat", "seed": 1, "size": "64x64"}
    b = {"prompt": "a blue dog on the grass", "seed": 99, "size": "64x64"}

    async def run():
        async with httpx.AsyncClient(base_url=server, timeout=120, headers=AUTH) as c:
            alone = [await c.post("/v1/images/generations", json=x) for x in (a, b)]
            for _ in range(5):  # until both land in one pipeline call (batch_wait_timeout_s is 0.1 s here)
                together = await asyncio.gather(*(c.post("/v1/images/generations", json=x) for x in (a, b)))
                if all(r.headers.get("x-batch-size") == "2" for r in together):
                    return alone, together
            raise AssertionError("two concurrent compatible requests were never batched together")

    alone, together = asyncio.run(run())
    for solo, batched in zip(alone, together, strict=True):
        x, y = np.asarray(images_of(solo)[0]).astype(int), np.asarray(images_of(batched)[0]).astype(int)
        assert np.abs(x - y).max() <= TOLERANCE
    a_img, b_img = (np.asarray(images_of(r)[0]).astype(int) for r in alone)
    assert np.abs(a_img - b_img).max() > 40  # different prompts and seeds give different images


def test_full_queue_answers_503_with_retry_after(server):
    async def flood(k):
        async with httpx.AsyncClient(base_url=server, timeout=120, headers=AUTH) as c:
            body = {"prompt": "load", "size": "64x64", "steps": 4}
            return await asyncio.gather(*(c.post("/v1/images/generations", json=body) for _ in range(k)))

    responses = asyncio.run(flood(16))
    codes = sorted(r.status_code for r in responses)
    assert set(codes) <= {200, 503}, codes
    busy = [r for r in responses if r.status_code == 503]
    assert busy and len(busy) < len(responses), codes  # 2 running + 2 queued fit; the rest are refused
    for r in busy:
        assert r.headers["retry-after"] == str(RETRY_AFTER_S)
        assert r.json()["error"]["type"] == "server_overloaded"


# --- adapters: many per replica (Ray Serve model multiplexing) -------------------------------------


def register_adapter(registered_model, name: str, seed: int, method: str = "lora", base_sha: str | None = None,
                     alias: str = "champion"):
    """A LoRA/LoKr of the served base (random weights: as training leaves them, but instant), registered the way
    training registers one and aliased; returns (version, its weights)."""
    cfg = registered_model.cfg
    mlflow.set_tracking_uri(registered_model.tracking_uri)
    mlflow.set_registry_uri(registered_model.tracking_uri)
    base_uri = f"models:/{registered_model.name}/{registered_model.version}"
    sha = base_sha or version_weights_sha256(registered_model.name, registered_model.version,
                                             cfg.state_path("cache", "models"))
    weights = random_adapter(registered_model.pipeline_dir, method, seed)
    folder = cfg.state_path("adapters", f"{name}-{seed}")
    save_adapter(folder, weights.state, weights.config)
    write_adapter_folder(folder, weights, base_uri, sha, json.loads((registered_model.pipeline_dir / "unet" /
                                                                     "config.json").read_text()))
    with mlflow.start_run(experiment_id=registered_model.experiment_id):
        version = log_adapter(folder, name, cfg.inference, base_uri, sha)
    mlflow.MlflowClient().set_registered_model_alias(name, alias, version)
    return version, weights


def expected_png(registered_model, weights, body: dict) -> np.ndarray:
    """The image of ``body`` from the base loaded alone in this process, with ``weights`` attached (None: bare)."""
    directory = registered_model.pipeline_dir
    pipes = build_pipelines(str(directory), inference_scheduler(diffusion_from_pipeline_dir(directory)),
                            registered_model.cfg.inference.model_dump())
    req = GenerationRequest(prompt=body["prompt"], width=64, height=64, steps=body["steps"], seed=body["seed"])
    slots = AdapterSlots(pipes.t2i.unet)
    if weights is not None:
        slots.ensure("alone", weights)
    with slots.running("alone" if weights is not None else None):
        return np.asarray(pipes.generate(req)[0]).astype(int)


def pixels(r: httpx.Response) -> np.ndarray:
    assert r.status_code == 200, r.text[:300]
    return np.asarray(images_of(r)[0]).astype(int)


@pytest.fixture(scope="module")
def adapters(server, registered_model):
    """Two adapters of the served base (a LoRA and a LoKr) and one of another base."""
    a_version, a = register_adapter(registered_model, "terminus-style", seed=11)
    b_version, b = register_adapter(registered_model, "terminus-sketch", seed=12, method="lokr")
    register_adapter(registered_model, "terminus-alien", seed=13, base_sha="0" * 64)
    return SimpleNamespace(a=a, b=b, a_version=a_version, b_version=b_version)


ADAPTER_BODY = {"prompt": "a lighthouse", "size": "64x64", "steps": 2, "seed": 21}


def test_one_replica_serves_two_adapters_and_the_base_each_with_its_own_images(client, server, registered_model,
                                                                               adapters):
    base = pixels(gen(client, **ADAPTER_BODY))
    style = gen(client, **ADAPTER_BODY, model="terminus-style@champion")  # the OpenAI model field
    sketch = client.post("/v1/images/generations", json=ADAPTER_BODY,  # Serve's multiplexing header
                         headers={**AUTH, "serve_multiplexed_model_id": "terminus-sketch@champion"})
    assert style.json()["model"] == "terminus-style" and style.json()["model_version"] == adapters.a_version
    assert style.json()["base_model"] == f"{registered_model.name}/{registered_model.version}"
    assert sketch.headers["x-model-version"] == f"terminus-sketch/{adapters.b_version}"
    for got, weights in ((base, None), (pixels(style), adapters.a), (pixels(sketch), adapters.b)):
        assert np.abs(got - expected_png(registered_model, weights, ADAPTER_BODY)).max() <= TOLERANCE
    assert np.abs(pixels(style) - base).max() > 10 and np.abs(pixels(sketch) - base).max() > 10

    a_body, b_body = {**ADAPTER_BODY, "model": "terminus-style@champion"}, {**ADAPTER_BODY, "model": "terminus-sketch"}

    async def post(c, body):
        # The model's queue here holds 2 (MAX_QUEUED): a request routed while the previous round drains may be
        # told 503 + Retry-After, and is sent again, as a client should.
        for _ in range(4):
            r = await c.post("/v1/images/generations", json=body)
            if not (r.status_code == 503 and "Retry-After" in r.headers):
                return r
            await asyncio.sleep(0.5)
        return r

    async def run(bodies):
        async with httpx.AsyncClient(base_url=server, timeout=120, headers=AUTH) as c:
            return await asyncio.gather(*(post(c, x) for x in bodies))

    for _ in range(5):  # the same adapter batches together (batch_wait_timeout_s is 0.1 s here)
        same = asyncio.run(run([a_body, a_body]))
        if all(r.headers.get("x-batch-size") == "2" for r in same):
            break
    else:
        raise AssertionError("two concurrent requests for one adapter were never batched together")
    for _ in range(3):  # different adapters never share a pipeline call, and each keeps its own images
        mixed = asyncio.run(run([a_body, b_body]))
        assert [r.status_code for r in mixed] == [200, 200], [r.text[:200] for r in mixed]
        assert [r.headers["x-batch-size"] for r in mixed] == ["1", "1"]
        assert np.abs(pixels(mixed[0]) - pixels(style)).max() <= TOLERANCE
        assert np.abs(pixels(mixed[1]) - pixels(sketch)).max() <= TOLERANCE

    listed = {d["id"]: d for d in client.get("/v1/models", headers=AUTH).json()["data"]}
    assert listed[registered_model.name]["kind"] == "base"
    assert listed["terminus-style@champion"]["kind"] == "adapter" and listed["terminus-style@champion"]["compatible"]
    assert listed["terminus-sketch@champion"]["method"] == "lokr"
    assert listed["terminus-alien@champion"]["compatible"] is False


def test_adapter_mistakes_get_4xx_naming_what_is_wrong(client, registered_model, adapters):
    r = gen(client, **ADAPTER_BODY, model="terminus-alien@champion")
    assert r.status_code == 409, r.text[:300]
    message = r.json()["error"]["message"]
    assert r.json()["error"]["code"] == "adapter_base_mismatch"
    assert "0" * 12 in message and f"models:/{registered_model.name}/{registered_model.version}" in message
    r = gen(client, **ADAPTER_BODY, model="terminus-nowhere@champion")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = client.post("/v1/images/generations", json={**ADAPTER_BODY, "model": "terminus-style"},
                    headers={**AUTH, "serve_multiplexed_model_id": "terminus-sketch@champion"})
    assert r.status_code == 400 and "different models" in r.json()["error"]["message"]
    r = gen(client, **ADAPTER_BODY, model="terminus-style@no-such-alias")
    assert r.status_code == 404


def test_the_lru_evicts_and_reloads_and_an_alias_move_hot_swaps(client, registered_model, adapters):
    """``serve.max_adapters_per_replica=2`` here: a third adapter evicts the least recently used one, which is
    read again on its next request and gives the same images; moving an adapter's alias swaps it in place."""
    def loads():
        (base,) = [d for d in client.get("/v1/models", headers=AUTH).json()["data"] if d["kind"] == "base"]
        return base["adapter_loads"], base["adapters_attached"]

    first = pixels(gen(client, **ADAPTER_BODY, model="terminus-style@champion"))
    pixels(gen(client, **ADAPTER_BODY, model="terminus-sketch@champion"))
    count, attached = loads()
    assert len(attached) == 2
    _, third = register_adapter(registered_model, "terminus-third", seed=14)
    pixels(gen(client, **ADAPTER_BODY, model="terminus-third@champion"))  # evicts terminus-style
    count_after, attached = loads()
    assert count_after == count + 1 and len(attached) == 2 and not any(k.startswith("terminus-style") for k in attached)
    again = pixels(gen(client, **ADAPTER_BODY, model="terminus-style@champion"))  # read again
    assert loads()[0] == count + 2
    assert np.abs(again - first).max() <= TOLERANCE

    # Promotion and rollback of an adapter are the registry's aliases, as for a full model; the replica follows.
    v2, moved = register_adapter(registered_model, "terminus-style", seed=15, alias="candidate")
    promote("terminus-style", v2, force_reason="serving test: not evaluated")

    def served_version(wanted: str) -> httpx.Response:
        deadline = time.monotonic() + 30
        while True:
            r = gen(client, **ADAPTER_BODY, model="terminus-style@champion")
            if r.json().get("model_version") == wanted or time.monotonic() > deadline:
                return r
            time.sleep(0.3)

    r = served_version(v2)
    assert r.json()["model_version"] == v2
    assert np.abs(pixels(r) - expected_png(registered_model, moved, ADAPTER_BODY)).max() <= TOLERANCE
    assert rollback("terminus-style").version == adapters.a_version
    r = served_version(adapters.a_version)
    assert r.json()["model_version"] == adapters.a_version and np.abs(pixels(r) - first).max() <= TOLERANCE


# --- adapters that cannot be served: hostile weights files, names that are not servable ------------


def test_each_hostile_adapter_file_is_a_422_and_the_base_stays_healthy(client, registered_model, adapters, tmp_path):
    """Adapter versions registered like any other whose stored weights file was then replaced (a pickle named
    .safetensors, an empty file, a cut header, a header longer than the file, a header or metadata that is not
    JSON, tensors of the wrong shapes, unknown tensors): each request for one is a 422 naming why in one line; the
    base keeps serving the same images and the pickle never runs."""
    before = pixels(gen(client, **ADAPTER_BODY))
    marker = tmp_path / "pickle-ran"
    good = registered_model.cfg.state_path("adapters", "terminus-style-11") / ADAPTER_FILE  # register_adapter's
    cache = registered_model.cfg.state_path("cache", "models")
    for i, (kind, data) in enumerate(hostile_files(good, marker).items()):
        name = f"terminus-hostile-{kind.replace('_', '-')}"
        version, _ = register_adapter(registered_model, name, seed=40 + i)
        stored = fetch_model(f"models:/{name}/{version}", cache, adapter_ok=True).pipeline_dir / ADAPTER_FILE
        stored.write_bytes(data)  # the registry's own copy: what the replica reads
        for _ in range(2):  # refused again the same way (an adapter that failed to attach is not retried)
            r = gen(client, **ADAPTER_BODY, model=f"{name}@champion")
            assert r.status_code == 422, (kind, r.status_code, r.text[:300])
            error = r.json()["error"]
            assert error["code"] == "adapter_unloadable" and error["param"] == "model", (kind, error)
            assert error["message"].startswith(f"adapter {name} v{version} cannot be loaded: "), (kind, error)
            assert "\n" not in error["message"] and str(stored.parent) not in error["message"], (kind, error)
    assert not marker.exists()
    assert np.abs(pixels(gen(client, **ADAPTER_BODY)) - before).max() == 0
    assert client.get("/healthz").status_code == 200
    assert np.abs(pixels(gen(client, **ADAPTER_BODY, model="terminus-sketch@champion"))
                  - expected_png(registered_model, adapters.b, ADAPTER_BODY)).max() <= TOLERANCE


def test_a_registered_full_model_and_an_unknown_name_answer_alike(client, registered_model):
    """Whether a name is registered (here a full model, not an adapter), unknown, or not readable by the server's
    registry credentials (tests/unit/deploy/test_served_adapters.py), the answer is the same 404: the client's own
    name is all that differs."""
    mlflow.set_tracking_uri(registered_model.tracking_uri)
    mlflow.set_registry_uri(registered_model.tracking_uri)
    with mlflow.start_run(experiment_id=registered_model.experiment_id):
        info = log_pipeline_model(registered_model.pipeline_dir, "terminus-hidden", registered_model.cfg.inference)
    mlflow.MlflowClient().set_registered_model_alias("terminus-hidden", "champion", info.registered_model_version)
    known = gen(client, **ADAPTER_BODY, model="terminus-hidden@champion")
    unknown = gen(client, **ADAPTER_BODY, model="terminus-absent@champion")
    assert known.status_code == unknown.status_code == 404, (known.text[:300], unknown.text[:300])
    assert known.text.replace("terminus-hidden", "terminus-absent") == unknown.text
    for word in ("RESOURCE_DOES_NOT_EXIST", "full model", "registry"):
        assert word not in known.text and word not in unknown.text
