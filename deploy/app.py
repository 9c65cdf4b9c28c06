"""The Serve application: a FastAPI ingress speaking the OpenAI Images API, and a model deployment.

    app = Ingress.bind(Model.bind(...))          (the Anyscale SDXL Serve template's shape)

``Model`` loads ``models:/NAME@ALIAS`` (champion by default) through the registry loader training
uses, follows the alias (hot swap, ``deploy/holder.py``), and runs compatible requests as one
pipeline call (``@serve.batch``, ``deploy/batching.py``). A request may name an adapter of that base (the
OpenAI ``model`` field or the ``serve_multiplexed_model_id`` header): it travels as the request's Serve
multiplexed model id, the replica keeps an LRU of adapters attached to its base (``@serve.multiplexed``,
``serve.max_adapters_per_replica``) and batches split by adapter (``deploy/served_adapters.py``,
docs/adapters.md). ``Ingress`` owns the HTTP contract (``deploy/api.py``): validation, auth, errors, and the 503 +
Retry-After of a full queue.

Routes: POST /v1/images/generations, POST /v1/images/edits (multipart; inpainting with a mask,
image-to-image without one), GET /v1/models, GET /healthz (open, for probes). When
``serve.api_key_env`` names an environment variable, every /v1 route requires
``Authorization: Bearer <its value>``; the variable must be set where the Ingress replicas run. A request body
must arrive within ``serve.body_timeout_s`` (else 408), and one client address may have at most
``serve.max_bodies_per_client`` slow bodies arriving at once (else 429 + Retry-After; ``Ingress``). An image response
carries ``Server-Timing`` (``server_timing``): the ingress route's, the model deployment's and its work's durations.

The ingress's event loop serves every client, so nothing CPU-bound runs on it: parsing a body (JSON,
multipart), decoding and resizing uploads, and encoding the response run in worker threads, except a JSON
body or a response of at most ``INLINE_BYTES``, where the hop to a thread would cost more than the work. ``/healthz``
answers from a readiness the ingress keeps current itself (the model's answers to requests, else one model call
per ``HEALTH_POLL_S``), so probes, which need no key, never take the model's queue slots.

Resources and scaling live in ``deploy/serve.yaml``; the decorator values below are the fallbacks
for ``serve.run(build_app(...))`` from Python. Nothing runs at import.
"""

# No ``from __future__ import annotations`` here: FastAPI must see real annotations on the methods that
# @serve.ingress rewrites (with string annotations it takes ``request: Request`` for a query parameter).
import asyncio
import base64
import hmac
import json
import logging
import math
import os
import resource
import time
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict
from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from components.config import Config, load_config
from components.diffusion.request import GenerationRequest, GenerationResult
from components.registry.tracking import tracking_uri
from deploy.api import (
    ApiError,
    BodyBudget,
    Streaming,
    adapter_id,
    api_token,
    decode_upload,
    error_body,
    parse_multipart,
    parse_params,
    raise_for_result,
    sse,
    stream_event,
    streaming,
    to_request,
)

# Model-side modules (torch, diffusers, mlflow) are imported inside Model only: the Ingress replica
# imports this module too, and stays light without them.

INLINE_BYTES = 64 * 1024
"""A request body, or a response's image bytes, up to this size is parsed or encoded on the event loop (tens of
microseconds); larger ones go to a worker thread, so that no client's upload stalls the others. The thread hop
costs more than the work below this size (docs/benchmarks.md, the Serve overhead breakdown)."""
HEALTH_POLL_S = 1.0
"""How long the ingress goes without an answer from the model deployment (a request's, or its ``info``) before it
asks whether a version is loaded (``/healthz`` reads the answer)."""
HEALTH_TIMEOUT_S = 2.0
BODY_GRACE_S = 1.0
"""A request body all arrived this long after the request reached the ingress takes no place in the body budget
(``serve.max_bodies_per_client``, ``serve.max_bodies``): a client's concurrent prompt requests never count, and
a slow body holds a slot uncounted for at most this long."""
HEALTH_STALE_S = HEALTH_POLL_S + HEALTH_TIMEOUT_S + 2.0
"""An answer older than this is not trusted (the watcher itself is stuck): ``/healthz`` says 503."""
UNAVAILABLE = (RayActorError, ActorDiedError, ActorUnavailableError, DeploymentUnavailableError)


# --- model deployment ----------------------------------------------------------------------------


@serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=8, max_queued_requests=32,
                  health_check_period_s=5)
class Model:
    """One replica = one loaded base pipeline version, swapped in place when the alias moves, and the adapters
    requests ask for (Ray Serve model multiplexing: ``_adapter`` is the ``@serve.multiplexed`` loader, its LRU
    sized by ``serve.max_adapters_per_replica``; deploy/served_adapters.py)."""

    def __init__(self, config: dict, model_uri: str, tracking: str, cache_dir: str):
        # MLflow, torch and the model load in the model replica: the ingress imports this module without them
        import mlflow

        from deploy.holder import ModelHolder

        self.cfg = Config.model_validate(config)
        mlflow.set_tracking_uri(tracking)
        mlflow.set_registry_uri(tracking)
        serve_cfg = self.cfg.serve
        warmup = None
        if serve_cfg.compile:  # the first request of each version would otherwise pay the compilation
            warmup = GenerationRequest(prompt="warm-up", width=serve_cfg.default_size, height=serve_cfg.default_size,
                                       steps=serve_cfg.default_steps, seed=0)
        self.holder = ModelHolder(model_uri, cache_dir, self.cfg.inference, period_s=serve_cfg.poll_alias_s,
                                  compile_backend=serve_cfg.compile_backend if serve_cfg.compile else None,
                                  warmup=warmup)
        # Loaded before the constructor returns: Serve runs check_health once right after it, and a
        # replica receives traffic only once that passes. A version that does not load is not an outage:
        # the replica starts on the last good one (deploy/holder.py) and keeps watching the alias.
        self.holder.start()
        self.holder.start_polling()
        from deploy.served_adapters import ReplicaAdapters

        self.adapters = ReplicaAdapters(cache_dir, self.cfg.serve.poll_alias_s)

        async def load_adapter(model_id: str):
            # An adapter of another base is refused before it takes a place in the LRU.
            adapter = await asyncio.to_thread(self.adapters.fetch, model_id)
            await asyncio.to_thread(self.adapters.check_base, adapter, self.holder.current)
            return adapter

        # Wired here, not as a decorated method, so that the LRU's size comes from the config.
        self._adapter = serve.multiplexed(max_num_models_per_replica=self.cfg.serve.max_adapters_per_replica)(
            load_adapter)
        self._batched.set_max_batch_size(self.cfg.serve.max_batch_size)
        self._batched.set_batch_wait_timeout_s(self.cfg.serve.batch_wait_timeout_s)

    def check_health(self) -> None:
        if not self.holder.ready:
            raise RuntimeError(f"{self.holder.uri} is not loaded")

    def info(self) -> dict[str, Any]:
        loaded = self.holder.current
        return {"name": loaded.name, "version": loaded.version, "uri": self.holder.uri,
                "loaded_at": loaded.loaded_at, "swaps": self.holder.swaps, "adapters_attached": self.adapters.attached,
                "adapter_loads": self.adapters.loads, "adapter_swaps": self.adapters.swaps}

    def memory(self) -> dict[str, int]:
        """This replica's peak resident memory, and on a GPU its peak allocated device memory (the benchmarks)."""
        import torch  # in the model replica only (see __init__)

        peak = {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
        if torch.cuda.is_available():
            peak["peak_device_bytes"] = torch.cuda.max_memory_allocated()
        return peak

    def adapters_listed(self) -> list[dict[str, Any]]:
        """The registry's adapters with an alias, and whether each was trained on the base served here."""
        import mlflow  # in the model replica only (see __init__)

        from components.registry.adapter_versions import listed_adapters

        try:
            return listed_adapters(self.adapters.base_sha256(self.holder.current))
        except mlflow.exceptions.MlflowException as err:  # the registry is down: the base is still served
            logging.getLogger(__name__).warning("listing the adapters failed: %s", str(err)[:200])
            return []

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        """One request, as deploy.api.to_request built it; the adapter, if any, is the request's multiplexed
        model id (``serve_multiplexed_model_id``)."""
        from deploy.served_adapters import AdapterRefused  # in the model replica only (see __init__)

        received = time.perf_counter()
        try:
            adapter = await self._request_adapter()
        except AdapterRefused as err:
            return err.result(request)
        out = await self._batched(request, adapter)
        out.model_s = time.perf_counter() - received
        return out

    async def _request_adapter(self):
        """The adapter the request's multiplexed model id names (the LRU: a lookup, or a load evicting the oldest),
        following its alias; None for the bare base. Raises ``AdapterRefused``."""
        model_id = serve.get_multiplexed_model_id()
        if not model_id:
            return None
        adapter = await self._adapter(model_id)
        await asyncio.to_thread(adapter.follow, self.cfg.serve.poll_alias_s)
        return adapter

    async def generate_stream(self, request: GenerationRequest, partial_images: int):
        """A streamed request (``handle.options(stream=True)``): yields its ``PartialImage``s as the sampler reaches
        them, then its ``GenerationResult``. It skips the batcher, not the limits: it holds one of this replica's
        ``max_ongoing_requests`` until it ends, runs on the same adapter path as a batch (one pipeline call at a
        time per UNet), and when the caller goes away (a client that disconnects) the remaining steps are skipped
        and the call ends once the running step has, freeing its slot."""
        from components.diffusion.pipelines import Partials  # in the model replica only (see __init__)
        from components.diffusion.request import PartialImage, encode_image
        from deploy.served_adapters import AdapterRefused

        received = time.perf_counter()
        try:
            adapter = await self._request_adapter()
        except AdapterRefused as err:
            yield err.result(request)
            return
        loop, ready = asyncio.get_running_loop(), asyncio.Queue()

        def emit(index: int, image) -> None:  # on the worker thread, between two denoising steps
            encoded = encode_image(image, request.output_format, request.output_compression)
            loop.call_soon_threadsafe(ready.put_nowait, PartialImage(index, encoded))

        partials = Partials(partial_images, emit)
        work = asyncio.ensure_future(asyncio.to_thread(self._run, self.holder.current, adapter, [request], partials))
        waiting = None
        try:
            while not work.done():
                waiting = asyncio.ensure_future(ready.get())
                await asyncio.wait({waiting, work}, return_when=asyncio.FIRST_COMPLETED)
                if waiting.done():
                    yield waiting.result()
                else:
                    waiting.cancel()
            while not ready.empty():  # emitted before the work ended: they were queued before its result
                yield ready.get_nowait()
            (out,) = work.result()
            out.model_s = time.perf_counter() - received
            yield out
        finally:
            partials.stop.set()  # the caller went away (or we are done): skip what is left of the steps
            if waiting is not None:
                waiting.cancel()
            await asyncio.wait({work})  # the pipeline call ends before the slot is given back

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.02)
    async def _batched(self, reqs: list[GenerationRequest], adapters: list) -> list[GenerationResult]:
        # Serve splits each batch by multiplexed model id: every request here asked for the same adapter (or none).
        loaded = self.holder.current  # one version for the whole batch, reported with every result
        return await asyncio.to_thread(self._run, loaded, adapters[0], reqs)

    def _run(self, loaded, adapter, reqs: list[GenerationRequest], partials=None) -> list[GenerationResult]:
        """The batch's work on a worker thread, timed there (``work_s`` of each result: ``Server-Timing``);
        ``partials`` (a streamed request's ``Partials``) reaches its pipeline call through ``PARTIALS``."""
        from deploy.batching import PARTIALS  # in the model replica only (see __init__)

        start = time.perf_counter()
        token = PARTIALS.set(partials)
        try:
            out = self.adapters.run(loaded, adapter, reqs)
        finally:
            PARTIALS.reset(token)
        work = time.perf_counter() - start
        for result in out:
            result.work_s = work
        return out

    def __del__(self):
        holder = getattr(self, "holder", None)
        if holder is not None:
            holder.stop()


# --- ingress -------------------------------------------------------------------------------------

api = FastAPI(title="Terminus images API (OpenAI Images API compatible)")


@api.exception_handler(ApiError)
async def _api_error(_: Request, err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


@api.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, err: StarletteHTTPException) -> JSONResponse:
    return JSONResponse(error_body(str(err.detail), "invalid_request_error"), status_code=err.status_code,
                        headers=getattr(err, "headers", None))


@api.exception_handler(Exception)
async def _server_error(_: Request, err: Exception) -> JSONResponse:
    """A bug of ours (never a client's mistake: those are ApiError): the same error shape, status 500."""
    return JSONResponse(error_body(f"internal server error ({type(err).__name__})", "server_error"), status_code=500)


class Readiness:
    """What ``/healthz`` answers, kept current by one watcher task that asks the model deployment (``ask``: its
    ``info`` call) when it has heard nothing from it for ``poll_s``. A request the model answered is an answer
    too (``seen``): under traffic the watcher asks nothing, so it never takes a queue slot a request could have
    had (with a small queue, its poll arriving beside two requests once turned one of them away). The watcher
    starts with the first probe, on the loop that serves requests, and the first probe waits for its first
    answer."""

    def __init__(self, ask: Callable[[], Awaitable[dict]], poll_s: float = HEALTH_POLL_S,
                 timeout_s: float = HEALTH_TIMEOUT_S, stale_s: float = HEALTH_STALE_S):
        self.ask, self.poll_s, self.timeout_s, self.stale_s = ask, poll_s, timeout_s, stale_s
        self._last: tuple[float, dict | None, str] = (0.0, None, "starting")  # (when, info, why not ready)
        self._checked = asyncio.Event()
        self._watcher: asyncio.Task | None = None

    async def _check(self) -> None:
        try:
            info = await asyncio.wait_for(self.ask(), timeout=self.timeout_s)
            self._last = (time.monotonic(), info, "")
        except Exception as err:  # any failure to answer means not ready, whatever its cause
            self._last = (time.monotonic(), None, type(err).__name__)
        self._checked.set()

    def seen(self, info: dict) -> None:
        """The model just answered a request, as ``info`` (its base's name and version): ready, as of now."""
        self._last = (time.monotonic(), info, "")
        self._checked.set()

    async def _watch(self) -> None:
        while True:
            quiet_for = time.monotonic() - self._last[0]
            if self._checked.is_set() and quiet_for < self.poll_s:
                await asyncio.sleep(self.poll_s - quiet_for)
                continue
            await self._check()

    async def current(self) -> tuple[dict | None, str]:
        """(the model's info, "") when ready, else (None, why not)."""
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.get_running_loop().create_task(self._watch())
        if not self._checked.is_set():
            try:
                await asyncio.wait_for(self._checked.wait(), timeout=self.timeout_s + 1.0)
            except TimeoutError:
                pass
        checked_at, info, why = self._last
        if info is not None and time.monotonic() - checked_at > self.stale_s:
            return None, "stale"  # the watcher itself is stuck: do not vouch for an old answer
        return info, why


async def read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The request body, refused with 413 past ``limit`` bytes (checked as it streams in, so a
    missing or false Content-Length does not get around it), and with 408 when it has not all arrived
    ``timeout_s`` after the call (``serve.body_timeout_s``): a client sending slowly holds the request's
    ingress slot for no longer."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ApiError(400, "invalid Content-Length header")
        if int(declared) > limit:
            raise ApiError(413, f"request body is {declared} bytes; the limit is {limit}")
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise ApiError(413, f"request body exceeds the limit of {limit} bytes")
                chunks.append(chunk)
    except TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {timeout_s:g} s ({size} bytes came); send it "
                       "again, faster or smaller", code="body_timeout") from None
    return b"".join(chunks)


async def receive_body(request: Request, budget: BodyBudget, client: str, limit: int, timeout_s: float,
                       grace_s: float = BODY_GRACE_S) -> bytes:
    """``read_body`` under ``budget``: refused at once, unread, when ``client`` (or the server) already has as many
    slow bodies arriving as the budget allows; a body all arrived within ``grace_s`` takes no place; one still
    arriving then takes a place for the rest of its wait, or is refused (429/503) if there is none."""
    budget.refuse_if_full(client)
    reading = asyncio.ensure_future(read_body(request, limit, timeout_s))
    try:
        await asyncio.wait({reading}, timeout=grace_s)
        if reading.done():
            return reading.result()
        with budget.receiving(client):
            return await reading
    finally:
        reading.cancel()  # refused, or the request itself was cancelled: stop reading (a no-op once done)


def served_base(out: GenerationResult) -> dict[str, str]:
    """The base model that answered a request, as ``/healthz`` names it (an adapter's result names its base)."""
    if out.base is None:
        return {"name": out.name, "version": out.version}
    name, _, version = out.base.rpartition("/")
    return {"name": name, "version": version}


def render_result(out: GenerationResult) -> JSONResponse:
    """The OpenAI Images response for a result: each image base64-encoded in JSON, the ``output_format`` it is
    in, ``background`` (always ``opaque``: the model makes no alpha), ``usage`` (``Usage``: tokens of the prompts,
    latent positions of the images), version headers. Defined above ``Ingress``: Serve serializes the class where
    it is declared, with the globals that exist by then."""
    body = {
        "created": int(time.time()),
        "data": [{"b64_json": base64.b64encode(image).decode(), "seed": out.seed + i}
                 for i, image in enumerate(out.images)],
        "output_format": out.output_format,
        "background": "opaque",
        "model": out.name,
        "model_version": out.version,
    }
    if out.usage is not None:
        body["usage"] = out.usage.body()
    headers = {"X-Model-Version": f"{out.name}/{out.version}", "X-Batch-Size": str(out.batch_size)}
    if out.base is not None:  # an adapter answered: name the base it ran on too
        body["base_model"] = out.base
        headers["X-Base-Model-Version"] = out.base
    return JSONResponse(body, headers=headers)


def server_timing(response: JSONResponse, out: GenerationResult, since: float) -> JSONResponse:
    """Adds ``Server-Timing`` (W3C; milliseconds): ``ingress`` from the route's start to the response built here,
    ``model`` the model deployment's own time for the request, ``work`` its batch's pipeline and image encoding. What
    a client measures beyond ``ingress`` is the HTTP proxy and the network; ``ingress`` beyond ``model`` the hop to
    the model replica and back; ``model`` beyond ``work`` the batch queue and the worker thread."""
    parts = [f"ingress;dur={(time.perf_counter() - since) * 1e3:.3f}"]
    if out.model_s is not None:
        parts.append(f"model;dur={out.model_s * 1e3:.3f}")
    if out.work_s is not None:
        parts.append(f"work;dur={out.work_s * 1e3:.3f}")
    response.headers["Server-Timing"] = ", ".join(parts)
    return response


@serve.deployment(ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=256, max_queued_requests=256,
                  health_check_period_s=10)
@serve.ingress(api)
class Ingress:
    """The HTTP routes. A request holds one of the replica's ``max_ongoing_requests`` slots from the moment the
    proxy hands it over, its body's arrival included; so every body is read under a deadline
    (``serve.body_timeout_s``), those still arriving after ``BODY_GRACE_S`` under ``BodyBudget``
    (``serve.max_bodies_per_client`` per client address, ``serve.max_bodies`` in all), and the slots beyond
    ``serve.max_bodies`` stay for ``/healthz`` and for the requests waiting on the model (whose own queue bounds
    them: 503 past it)."""

    def __init__(self, model: DeploymentHandle, config: dict, served_name: str):
        self.model = model
        self.cfg = Config.model_validate(config)
        self.served_name = served_name
        # Fails closed: a configured but unset or blank key never leaves the endpoint open.
        self.token: bytes | None = api_token(self.cfg.serve.api_key_env, os.environ)
        self.readiness = Readiness(self._info)
        s = self.cfg.serve
        self.bodies = BodyBudget(s.max_bodies_per_client, s.max_bodies, s.retry_after_s)

    async def _body(self, request: Request) -> bytes:
        """The request's body, under the body budget and deadline. The client is the address Serve's HTTP proxy
        reports (``request.client``: the peer, or the last untrusted X-Forwarded-For hop when the peer is in
        uvicorn's ``FORWARDED_ALLOW_IPS``; docs/reliability.md, Endpoint)."""
        client = request.client.host if request.client is not None else "unknown"
        return await receive_body(request, self.bodies, client, self.cfg.serve.max_upload_bytes,
                                  self.cfg.serve.body_timeout_s)

    def _authorize(self, request: Request) -> None:
        if self.token is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.token):
            raise ApiError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    def _retry_after(self, seconds: float | None) -> dict[str, str]:
        return {"Retry-After": str(math.ceil(seconds if seconds is not None else self.cfg.serve.retry_after_s))}

    async def _info(self) -> dict[str, Any]:
        return await self.model.info.remote()

    @api.get("/healthz")
    async def healthz(self) -> JSONResponse:
        """Ready only once a model replica has its version loaded and answers (the probe for load
        balancers); 503 while none is loaded. Answered from ``Readiness``: any number of anonymous
        probes costs at most one model call per HEALTH_POLL_S, and none while requests are being answered."""
        info, why = await self.readiness.current()
        if info is None:
            return JSONResponse({"status": "unavailable", "reason": why}, status_code=503,
                                headers=self._retry_after(None))
        return JSONResponse({"status": "ready", "model": info["name"], "version": info["version"]})

    @api.get("/v1/models")
    async def models(self, request: Request) -> JSONResponse:
        self._authorize(request)
        info = await self._call(self._info())
        entry = {"id": info["name"], "object": "model", "created": int(info["loaded_at"]),
                 "owned_by": "terminus-platform", "version": info["version"], "uri": info["uri"], "kind": "base",
                 "adapters_attached": info["adapters_attached"], "adapter_loads": info["adapter_loads"]}
        adapters = await self._call(self.model.adapters_listed.remote())
        data = [entry, *({"object": "model", "owned_by": "terminus-platform", "kind": "adapter", **a}
                         for a in adapters)]
        return JSONResponse({"object": "list", "data": data})

    @api.post("/v1/images/generations")
    async def generations(self, request: Request) -> Response:
        since = time.perf_counter()
        self._authorize(request)
        body = await self._body(request)
        header = serve.get_multiplexed_model_id()
        if len(body) <= INLINE_BYTES:  # a typical prompt: parsed here, without a hop to a worker thread
            return await self._respond(*self._generation_request(body, header), since=since)
        return await self._respond(*await asyncio.to_thread(self._generation_request, body, header), since=since)

    def _generation_request(self, body: bytes, header: str) -> tuple[GenerationRequest, str | None, Streaming | None]:
        """JSON body -> (request, adapter, streaming) (a worker thread: parsing up to max_upload_bytes of JSON is
        CPU)."""
        try:
            raw = json.loads(body)
        except (ValueError, RecursionError):
            raise ApiError(400, "request body is not valid JSON") from None
        params = parse_params(raw)
        adapter = adapter_id(params.model, header or None, self.served_name)
        return to_request(params, self.cfg), adapter, streaming(params, "image_generation")

    @api.post("/v1/images/edits")
    async def edits(self, request: Request) -> Response:
        """Inpainting when a mask is sent (its transparent pixels are repainted, as OpenAI's), else
        image-to-image: the image is noised to ``strength`` and denoised with the prompt. Default strengths:
        ``inference.inpaint_strength`` (1.0: the masked area from pure noise, so a ZT-SNR model reaches its
        full range) and ``inference.img2img_strength`` (0.8)."""
        since = time.perf_counter()
        self._authorize(request)
        body = await self._body(request)
        content_type = request.headers.get("content-type", "")
        header = serve.get_multiplexed_model_id()
        return await self._respond(*await asyncio.to_thread(self._edit_request, content_type, body, header),
                                   since=since)

    def _edit_request(self, content_type: str, body: bytes,
                      header: str) -> tuple[GenerationRequest, str | None, Streaming | None]:
        """Multipart body -> request (a worker thread: parsing, decoding and resizing the uploads is CPU,
        seconds for a 4096x4096 image and its mask, and would stall every other client on the loop)."""
        fields, files = parse_multipart(content_type, body)
        unknown = set(files) - {"image", "mask"}
        if unknown:
            raise ApiError(400, f"unexpected file field {sorted(unknown)[0]!r}", param=sorted(unknown)[0])
        if "image" not in files:
            raise ApiError(400, "missing required file 'image'", param="image")
        image = decode_upload(files["image"], "image", self.cfg)
        mask = decode_upload(files["mask"], "mask", self.cfg) if "mask" in files else None
        params = parse_params(fields)
        adapter = adapter_id(params.model, header or None, self.served_name)
        return to_request(params, self.cfg, image=image, mask=mask), adapter, streaming(params, "image_edit")

    async def _call(self, awaitable):
        """Await a model call, mapping Serve's capacity and availability errors to 503 + Retry-After."""
        try:
            return await awaitable
        except BackPressureError as err:
            raise ApiError(503, "the server is at capacity (request queue full); retry after the delay in "
                           "Retry-After", type="server_overloaded",
                           headers=self._retry_after(err.retry_after_s)) from None
        except UNAVAILABLE:
            raise ApiError(503, "no model replica is available right now; retry shortly",
                           type="service_unavailable", headers=self._retry_after(None)) from None

    async def _respond(self, request: GenerationRequest, adapter: str | None, stream: Streaming | None,
                       since: float) -> Response:
        """Run ``request`` on the base, or with ``adapter`` (a multiplexed model id: Serve routes it to a replica
        that has the adapter loaded, where it can); streamed when ``stream`` says so (``_stream``). ``since``: when
        the route started (``Server-Timing``)."""
        if stream is not None:
            return await self._stream(request, adapter, stream)
        handle = self.model.generate if adapter is None else self.model.generate.options(multiplexed_model_id=adapter)
        out: GenerationResult = await self._call(handle.remote(request))
        raise_for_result(out)
        self.readiness.seen(served_base(out))
        if sum(map(len, out.images)) <= INLINE_BYTES:  # small images: encoded here, in well under a millisecond
            return server_timing(render_result(out), out, since)
        return server_timing(await asyncio.to_thread(render_result, out), out, since)  # base64 and JSON: CPU

    async def _stream(self, request: GenerationRequest, adapter: str | None, stream: Streaming) -> Response:
        """Server-sent events of ``Model.generate_stream``: its partial images, then the completed image. Its first
        answer is awaited before the response starts, so a full queue is still a 503 and a refusal (too many
        tokens, an adapter that does not exist) still a 4xx JSON error; a failure after that is an ``error`` event.
        A client that goes away cancels the model's call (its slot is freed once the running step ends)."""
        handle = self.model.generate_stream.options(stream=True)
        if adapter is not None:
            handle = handle.options(multiplexed_model_id=adapter)
        answers = handle.remote(request, stream.partial_images)
        try:
            first = await self._call(answers.__anext__())
        except BaseException:
            answers.cancel()
            raise
        if isinstance(first, GenerationResult):
            raise_for_result(first)

        async def events():
            try:
                item = first
                while True:
                    if isinstance(item, GenerationResult) and item.failure is None and item.error is None:
                        self.readiness.seen(served_base(item))
                    yield stream_event(item, request, stream)
                    if isinstance(item, GenerationResult):
                        return
                    try:
                        item = await answers.__anext__()
                    except (RayActorError, ActorDiedError, ActorUnavailableError):  # the replica died mid-stream
                        yield sse("error", ApiError(503, "the model replica went away during the stream; retry",
                                                    type="service_unavailable").body())
                        return
            finally:
                answers.cancel()  # a no-op once the model's generator ended; else it stops the generation

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


# --- application builder --------------------------------------------------------------------------


class AppArgs(BaseModel):
    """``args:`` of deploy/serve.yaml, or the dict given to :func:`build_app` from Python."""

    model_config = ConfigDict(extra="forbid")

    config: str | None = None
    """A preset (e.g. flows/configs/tiny.yaml); None: the config defaults."""
    overrides: list[str] = []
    """``key.path=value`` overrides, as the flows' ``--set``."""
    model_uri: str | None = None
    """Overrides serve.model_uri; None there too: ``models:/<tracking.registered_model>@champion``."""
    model_options: dict[str, Any] = {}
    ingress_options: dict[str, Any] = {}
    """``.options(...)`` for Python callers without a Serve YAML (tests, benchmarks)."""


def build_app(args: dict[str, Any]) -> serve.Application:
    """Application builder for ``import_path: deploy.app:build_app`` and ``serve.run(build_app({...}))``."""
    a = AppArgs.model_validate(args)
    cfg = load_config(a.config, a.overrides)
    return compose(cfg, a.model_uri, a.model_options, a.ingress_options)


def compose(
    cfg: Config, model_uri: str | None = None, model_options: dict[str, Any] | None = None,
    ingress_options: dict[str, Any] | None = None,
) -> serve.Application:
    """``Ingress.bind(Model.bind(...))`` for a config.

    The tracking URI is resolved here (config, then MLFLOW_TRACKING_URI, then the state dir's
    SQLite) and handed to the replicas, which need not share the caller's environment.
    """
    from components.registry.model import parse_model_uri  # MLflow stays out of the ingress (see Model.__init__)

    uri = model_uri or cfg.serve.model_uri or f"models:/{cfg.tracking.registered_model}@champion"
    name, _, _ = parse_model_uri(uri)
    config = cfg.model_dump(mode="json")
    model = Model.options(**(model_options or {})).bind(
        config, uri, tracking_uri(cfg), str(cfg.state_path("cache", "serve"))
    )
    return Ingress.options(**(ingress_options or {})).bind(model, config, name)
