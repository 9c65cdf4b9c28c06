"""The running Serve app over real HTTP (httpx on loopback): OpenAI-shaped requests, auth, errors,
edits, batching without mixing, and the 503 of a full queue. Serve starts once for the module."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import secrets

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.fixtures.processes import REPO, free_port

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
    from ray import serve

    from deploy.app import build_app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = {
        "config": str(REPO / "flows/configs/tiny.yaml"),
        "overrides": [
            *registered_model.overrides, f"serve.api_key_env={ENV}", "serve.default_steps=2",
            "serve.default_size=64", "serve.max_upload_bytes=200000", "serve.max_upload_pixels=262144",
            "serve.batch_wait_timeout_s=0.1",
        ],
        "model_options": {"max_ongoing_requests": 2, "max_queued_requests": 2,
                          "backpressure_config": {"retry_after_s": RETRY_AFTER_S}},
        # The key reaches the ingress replica the way a deployment would get it: its own environment, with
        # the trailing newline of a Secret made with --from-file (clients send the key without it).
        "ingress_options": {"ray_actor_options": {"num_cpus": 0.5,
                                                  "runtime_env": {"env_vars": {ENV: TOKEN + "\n"}}}},
    }
    try:
        serve.run(build_app(args), name="api", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()


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


def test_bearer_auth(client):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"},
                    {"Authorization": TOKEN}):
        r = client.post("/v1/images/generations", json={"prompt": "a"}, headers=headers)
        assert r.status_code == 401, headers
        assert r.headers["www-authenticate"] == "Bearer"
        assert r.json()["error"]["code"] == "invalid_api_key"
    assert client.get("/v1/models").status_code == 401
    assert client.get("/healthz").status_code == 200  # probes carry no key


def test_models_lists_the_served_version(client, registered_model):
    r = client.get("/v1/models", headers=AUTH)
    assert r.status_code == 200
    (entry,) = r.json()["data"]
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
        (client.post("/v1/images/generations", content=b"{not json", headers={**AUTH, "content-type": "application/json"}), 400),
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
