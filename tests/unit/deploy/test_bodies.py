"""Request bodies at the ingress: each under a deadline, slow ones under a budget per client address and one in
all, and the Serve YAML's ingress slots sized so that bodies being received never take the ones ``/healthz`` and
model calls need."""

from __future__ import annotations

import asyncio
import time

import pytest
import yaml
from starlette.requests import Request

from components.config import Config
from deploy.api import ApiError, BodyBudget
from deploy.app import read_body, receive_body
from tests.fixtures.processes import REPO


def test_a_client_past_its_budget_is_refused_429_at_once_and_others_still_get_in():
    budget = BodyBudget(per_client=2, total=3, retry_after_s=1.0)
    with budget.receiving("10.0.0.1"), budget.receiving("10.0.0.1"):
        with pytest.raises(ApiError) as err:
            with budget.receiving("10.0.0.1"):
                pass
        assert err.value.status == 429 and err.value.headers == {"Retry-After": "1"}
        assert err.value.body()["error"]["code"] == "rate_limit_exceeded"
        with budget.receiving("10.0.0.2"):  # the third place in all: another address
            with pytest.raises(ApiError) as full:
                with budget.receiving("10.0.0.3"):
                    pass
            assert full.value.status == 503 and full.value.headers["Retry-After"] == "1"
    assert budget.by_client == {} and budget.receiving_now == 0


def test_a_place_is_given_back_when_its_body_fails():
    budget = BodyBudget(per_client=1, total=1, retry_after_s=2.5)
    for _ in range(3):
        with pytest.raises(ApiError), budget.receiving("10.0.0.1"):
            raise ApiError(408, "too slow")
    assert budget.by_client == {} and budget.receiving_now == 0
    with budget.receiving("10.0.0.1"):
        assert budget.headers == {"Retry-After": "3"}


def slow_request(chunks: list[bytes], every_s: float, content_length: int | None = None) -> Request:
    """A request whose body arrives as ``chunks``, one each ``every_s`` seconds (a slow client)."""
    pending = list(chunks)

    async def receive():
        await asyncio.sleep(every_s)
        chunk = pending.pop(0) if pending else b""
        return {"type": "http.request", "body": chunk, "more_body": bool(pending)}

    headers = [] if content_length is None else [(b"content-length", str(content_length).encode())]
    return Request({"type": "http", "method": "POST", "path": "/", "headers": headers, "query_string": b""},
                   receive)


def test_a_body_that_does_not_arrive_in_time_is_a_408_at_the_deadline():
    request = slow_request([b"x"] * 100, every_s=0.05, content_length=100)
    start = time.monotonic()
    with pytest.raises(ApiError) as err:
        asyncio.run(read_body(request, limit=1000, timeout_s=0.5))
    took = time.monotonic() - start
    assert err.value.status == 408 and err.value.code == "body_timeout", err.value.message
    assert "0.5 s" in err.value.message and "\n" not in err.value.message
    assert 0.4 < took < 2.0


def test_a_body_in_time_is_read_whole_and_the_size_limit_still_holds():
    assert asyncio.run(read_body(slow_request([b"ab", b"cd"], every_s=0.01), limit=10, timeout_s=5)) == b"abcd"
    with pytest.raises(ApiError) as err:
        asyncio.run(read_body(slow_request([b"x" * 8, b"x" * 8], every_s=0.01), limit=10, timeout_s=5))
    assert err.value.status == 413


def test_prompt_bodies_take_no_place_however_many_one_client_sends_at_once():
    budget = BodyBudget(per_client=2, total=4, retry_after_s=1.0)

    async def run():
        return await asyncio.gather(*(receive_body(slow_request([b"{}"], every_s=0.01), budget, "10.0.0.1", 100, 5,
                                                   grace_s=0.5) for _ in range(16)))

    assert asyncio.run(run()) == [b"{}"] * 16
    assert budget.by_client == {} and budget.receiving_now == 0


def test_slow_bodies_past_the_grace_take_places_and_the_next_is_refused_at_once():
    budget = BodyBudget(per_client=2, total=4, retry_after_s=1.0)

    async def one(client: str) -> tuple[int, float]:
        start = time.monotonic()
        try:
            await receive_body(slow_request([b"x"] * 50, every_s=0.05), budget, client, 100, timeout_s=1.5,
                               grace_s=0.2)
            status = 200
        except ApiError as err:
            status = err.status
        return status, time.monotonic() - start

    async def run():
        first = [asyncio.create_task(one("10.0.0.1")) for _ in range(3)]
        await asyncio.sleep(0.4)  # two of them hold the address's places now, the third was refused at its grace
        held = dict(budget.by_client)
        late = await one("10.0.0.1")
        other = asyncio.create_task(one("10.0.0.2"))
        return await asyncio.gather(*first), held, late, await other

    first, held, late, other = asyncio.run(run())
    assert held == {"10.0.0.1": 2}
    assert sorted(status for status, _ in first) == [408, 408, 429]
    assert [took < 0.6 for status, took in first if status == 429] == [True]
    assert late[0] == 429 and late[1] < 0.05  # refused at once, unread
    assert other[0] == 408  # another address still had room
    assert budget.by_client == {} and budget.receiving_now == 0


def ingress_and_model(spec: dict) -> tuple[dict, dict]:
    deployments = {d["name"]: d for d in spec["applications"][0]["deployments"]}
    return deployments["Ingress"], deployments["Model"]


@pytest.mark.parametrize("path", ["deploy/serve.yaml", "deploy/kubernetes/rayservice.yaml"])
def test_bodies_being_received_leave_ingress_slots_for_probes_and_model_calls(path):
    """Every ingress slot a body can hold (``serve.max_bodies``) plus every request the model deployment can hold
    or queue (past that the ingress answers 503 at once) still leaves slots free for ``/healthz``."""
    spec = yaml.safe_load((REPO / path).read_text())
    if "serveConfigV2" in spec.get("spec", {}):
        spec = yaml.safe_load(spec["spec"]["serveConfigV2"])
    ingress, model = ingress_and_model(spec)
    serve = Config().serve
    replicas = model.get("autoscaling_config", {}).get("max_replicas", model.get("num_replicas", 1))
    model_capacity = replicas * model["max_ongoing_requests"] + model["max_queued_requests"]
    free = ingress["max_ongoing_requests"] - serve.max_bodies - model_capacity
    assert free >= 32, (ingress["max_ongoing_requests"], serve.max_bodies, model_capacity)
    assert serve.max_bodies_per_client < serve.max_bodies
    assert ingress["max_queued_requests"] >= ingress["max_ongoing_requests"]
