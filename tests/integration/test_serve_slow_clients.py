"""Slow clients against the running endpoint at its production slots, over real HTTP on loopback.

A request body is awaited inside an ingress request slot, the slots ``/healthz`` and generations use too. Here 146
connections to ``/v1/images/edits`` each send their headers (a Content-Length of 100 kB) and then one byte per
second: 20 from one address, the rest 7 from each of 18 others (all loopback, 127.0.0.x). The promises:

- ``/healthz`` keeps answering 200 in under 1 s (p99), and a generation sent meanwhile is served;
- the one address gets ``serve.max_bodies_per_client`` (8) bodies received, its other connections 429 +
  Retry-After once their body is still arriving after the ingress's grace (``BODY_GRACE_S``, 1 s);
- every body still arriving at ``serve.body_timeout_s`` is answered 408, one line of JSON in the API's error shape.

The app runs with deploy/serve.yaml's Model and Ingress options (its ``max_ongoing_requests`` slots) and the
config's body budgets; only the body deadline is shortened (to ``BODY_TIMEOUT_S``) to keep the test short. Every
socket is closed when the test ends, however it ends. Run with ``-s`` to see the probe latencies.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import statistics
import time
from collections import Counter

import httpx
import pytest
import yaml

from components.config import Config
from tests.fixtures.processes import REPO
from tests.fixtures.servers import serve_app
from tests.integration.test_serve_faults import production_model_options

APP = f"slow-{secrets.token_hex(3)}"
ENV = "TERMINUS_SLOW_API_KEY"
TOKEN = "sk-slow-" + secrets.token_hex(12)
AUTH = {"Authorization": f"Bearer {TOKEN}"}
BODY_TIMEOUT_S = 8.0
PER_CLIENT = Config().serve.max_bodies_per_client
HEAVY = ("127.0.0.2", 20)  # one address with more slow bodies than its budget
SPREAD = [(f"127.0.0.{10 + i}", 7) for i in range(18)]  # addresses within their budget: 126 bodies held at once
PROBE_BOUND_S = 1.0
PROBE_EVERY_S = 0.1
GENERATION_TIMEOUT_S = 20.0


def production_ingress_options() -> dict:
    """deploy/serve.yaml's options for the Ingress deployment (its slots and backpressure)."""
    spec = yaml.safe_load((REPO / "deploy/serve.yaml").read_text())
    (ingress,) = [d for d in spec["applications"][0]["deployments"] if d["name"] == "Ingress"]
    return {k: v for k, v in ingress.items() if k != "name"}


@pytest.fixture(scope="module")
def server(ray_local, registered_model):
    ingress = production_ingress_options()
    ingress["ray_actor_options"] = {**ingress["ray_actor_options"], "runtime_env": {"env_vars": {ENV: TOKEN}}}
    args = {
        "overrides": [*registered_model.overrides, f"serve.api_key_env={ENV}", "serve.default_steps=1",
                      "serve.default_size=64", f"serve.body_timeout_s={BODY_TIMEOUT_S}"],
        "model_options": {**production_model_options(), "num_replicas": 1},
        "ingress_options": ingress,
    }
    with serve_app(APP, args) as base:
        yield base


class SlowClient:
    """One connection from ``address`` that sends an edit's headers, then a byte a second until it is answered."""

    def __init__(self, address: str):
        self.address = address
        self.writer: asyncio.StreamWriter | None = None
        self.status: int | None = None
        self.headers: dict[str, str] = {}
        self.body = b""
        self.answered_after_s: float | None = None

    async def run(self, port: int, until: float) -> None:
        reader, self.writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(self.address, 0))
        start = time.monotonic()
        self.writer.write(("POST /v1/images/edits HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                           f"Authorization: Bearer {TOKEN}\r\n"
                           "Content-Type: multipart/form-data; boundary=slowslowslow\r\n"
                           "Content-Length: 100000\r\n\r\n").encode())
        await self.writer.drain()
        received = b""
        while time.monotonic() < until:
            try:
                chunk = await asyncio.wait_for(reader.read(65536), timeout=1.0)
            except TimeoutError:
                try:
                    self.writer.write(b"-")  # the next byte of the body
                    await self.writer.drain()
                except ConnectionError:  # the server closed the connection: whatever it answered was read
                    break
                continue
            received += chunk
            if self._parse(received) or not chunk:
                break
        self.answered_after_s = time.monotonic() - start if self.status is not None else None

    def _parse(self, raw: bytes) -> bool:
        """True once ``raw`` holds a whole response (status line, headers, a body of its Content-Length)."""
        head, sep, body = raw.partition(b"\r\n\r\n")
        if not sep:
            return False
        lines = head.decode("latin-1").split("\r\n")
        headers = dict(line.split(": ", 1) for line in lines[1:])
        headers = {k.lower(): v for k, v in headers.items()}
        if len(body) < int(headers.get("content-length", 0)):
            return False
        self.status, self.headers, self.body = int(lines[0].split()[1]), headers, body
        return True

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            try:
                await asyncio.wait_for(self.writer.wait_closed(), timeout=2.0)
            except (TimeoutError, ConnectionError):
                pass


def assert_one_line_json_error(client: SlowClient, status: int) -> dict:
    assert client.status == status, (client.address, client.status, client.body[:200])
    assert b"\n" not in client.body.strip(), client.body[:300]
    error = json.loads(client.body)["error"]
    assert isinstance(error["message"], str) and error["message"] and error["type"], error
    return error


def test_slow_bodies_leave_healthz_and_generations_served(server):
    port = int(server.rsplit(":", 1)[1])
    heavy = [SlowClient(HEAVY[0]) for _ in range(HEAVY[1])]
    spread = [SlowClient(address) for address, count in SPREAD for _ in range(count)]
    clients = heavy + spread
    assert len(clients) >= 140

    async def run():
        probes: list[float] = []
        statuses: Counter = Counter()
        tasks: list[asyncio.Task] = []
        try:
            async with httpx.AsyncClient(base_url=server, timeout=5.0) as http:
                # The first probe starts the ingress's readiness watcher and waits for the model's first answer:
                # sent before the slow clients, so that the probes below measure only what they do.
                assert (await http.get("/healthz", timeout=30.0)).status_code == 200
                until = time.monotonic() + BODY_TIMEOUT_S + 12.0  # the bound on every connection of the test
                tasks = [asyncio.create_task(c.run(port, until)) for c in clients]
                await asyncio.sleep(2.0)  # every slow request is at the ingress, past its grace, sending its body
                generation = asyncio.create_task(http.post(
                    "/v1/images/generations", json={"prompt": "a red cube", "size": "64x64"}, headers=AUTH,
                    timeout=GENERATION_TIMEOUT_S))
                probe_until = time.monotonic() + BODY_TIMEOUT_S - 3.0  # while the held bodies still arrive
                while time.monotonic() < probe_until:
                    start = time.perf_counter()
                    try:
                        r = await http.get("/healthz")
                        statuses[r.status_code] += 1
                    except httpx.TimeoutException:
                        statuses["timeout"] += 1
                    probes.append(time.perf_counter() - start)
                    await asyncio.sleep(PROBE_EVERY_S)
                try:
                    generated = await generation
                except httpx.TimeoutException:
                    generated = None
            await asyncio.wait_for(asyncio.gather(*tasks), timeout=until - time.monotonic() + 5.0)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await asyncio.gather(*(c.close() for c in clients))
        return probes, statuses, generated

    probes, statuses, generated = asyncio.run(run())
    p99 = statistics.quantiles(probes, n=100, method="inclusive")[98]
    answers = Counter(c.status for c in clients)
    print(f"\n/healthz under {len(clients)} slow bodies: {len(probes)} probes, p50 {statistics.median(probes):.3f} s, "
          f"p99 {p99:.3f} s, max {max(probes):.3f} s; statuses {dict(statuses)}; slow clients answered "
          f"{dict(answers)}; generation {generated.status_code if generated is not None else 'timed out'}")

    assert statuses == Counter({200: len(probes)}) and len(probes) >= 10, statuses
    assert p99 < PROBE_BOUND_S, f"/healthz p99 {p99:.3f} s under slow bodies"
    assert generated is not None, f"the generation got no answer in {GENERATION_TIMEOUT_S:g} s"
    assert generated.status_code == 200, generated.text[:300]
    assert generated.json()["data"][0]["b64_json"]

    refused = [c for c in heavy if c.status == 429]
    assert len(refused) == HEAVY[1] - PER_CLIENT, Counter(c.status for c in heavy)
    for c in refused:
        assert_one_line_json_error(c, 429)
        assert int(c.headers["retry-after"]) >= 1 and c.answered_after_s < 5.0
    held = [c for c in clients if c not in refused]
    assert len(held) == PER_CLIENT + sum(count for _, count in SPREAD)
    for c in held:
        error = assert_one_line_json_error(c, 408)
        assert error["code"] == "body_timeout"
        assert BODY_TIMEOUT_S - 0.5 < c.answered_after_s < BODY_TIMEOUT_S + 8.0, c.answered_after_s
