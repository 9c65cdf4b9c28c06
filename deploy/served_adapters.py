"""Adapters served on the base a replica holds: loaded per request, attached to the base's UNet, swapped in place.

Ray Serve's model multiplexing (``@serve.multiplexed``, wired in ``deploy/app.py``) decides which replica gets a
request for an adapter and keeps the least recently used adapters of a replica in an LRU of
``serve.max_adapters_per_replica`` entries; ``@serve.batch`` splits every batch by the multiplexed model id, so the
requests of one pipeline call share one adapter. This module is what the multiplexed loader returns and what a
batch runs through:

- ``ServedAdapter``: one multiplexed model id (``NAME@ALIAS`` or ``NAME/VERSION``), the adapter version it names
  now and that version's weights in host memory. ``follow`` re-reads the alias every ``serve.poll_alias_s`` and,
  when it has moved, loads the new version in place (hot swap: the next batch attaches the new weights, the old
  ones are detached). Ray calls ``__del__`` when the LRU evicts it: its attached copies are marked for detaching,
  which the next batch does under the UNet's lock (an eviction never waits for a running batch).
- ``ReplicaAdapters``: the base's ``AdapterSlots`` (components/diffusion/adapters.py) for the base version the
  holder serves now (a base hot swap starts a fresh set), the base's content hash, and ``run``: one batch on the
  base with one adapter active, or none.

An adapter is served only on the base it was trained on: its ``base_weights_sha256`` must equal the content hash
of the base version this replica holds (``AdapterRefused``, 409, naming both). A name that is not a servable
adapter -- unknown, not readable with the server's registry credentials, or a full model -- is one answer, 404
``model_not_found`` (``not_served``: the same status and body whatever the registry said, so the answers tell no
one which registered names exist; the registry's reason goes to the replica's log). An adapter whose weights file
cannot be read or does not fit the base (not safetensors, a cut or lying header, tensors of other names or
shapes) is refused 422 ``adapter_unloadable`` with the reason in one line: the file is never unpickled, and a failed
attach leaves the base as it was. Nothing here knows about Ray.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from components.diffusion.adapters import ADAPTER_FILE, AdapterError, AdapterSlots, AdapterWeights, adapter_file
from components.diffusion.request import GenerationRequest, GenerationResult
from components.registry.adapter_versions import AdapterVersion, fetch_adapter, version_weights_sha256
from components.registry.model import ModelUriError, resolve_version
from deploy.batching import serve_batch
from deploy.holder import Loaded, _file_lock

log = logging.getLogger(__name__)


class AdapterRefused(Exception):
    """A request's adapter cannot be served here: not a servable adapter (404), a weights file that cannot be
    loaded (422), of another base (409)."""

    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code

    def result(self, req: GenerationRequest) -> GenerationResult:
        return GenerationResult("", "", req.seed, [], error=self.message, param="model", status=self.status,
                                code=self.code)


def not_served(model_id: str, why: Exception) -> AdapterRefused:
    """The one answer for a name that is not a servable adapter, whatever the registry said (module docstring)."""
    log.info("adapter %s refused as not served: %s", model_id, str(why)[:300])
    return AdapterRefused(404, f"model {model_id!r} is not served here; GET /v1/models lists the base and its "
                          "adapters", "model_not_found")


def unloadable(version: AdapterVersion, err: AdapterError) -> AdapterRefused:
    """422 for an adapter version whose weights cannot be loaded, the reason in one line without the server's
    paths."""
    reason = str(err).replace(str(adapter_file(version.directory)), ADAPTER_FILE).replace(
        str(version.directory), "the adapter folder").splitlines()[0][:300]
    log.warning("adapter %s v%s cannot be loaded: %s", version.name, version.version, reason)
    return AdapterRefused(422, f"adapter {version.name} v{version.version} cannot be loaded: {reason}",
                          "adapter_unloadable")


@dataclass
class ServedAdapter:
    """The adapter version a multiplexed model id names now, with its weights (module docstring)."""

    model_id: str
    loaded: tuple[AdapterVersion, AdapterWeights] = field(repr=False)
    """The version and its weights, replaced together by one assignment (a batch reads the pair once)."""
    checked_at: float
    owner: ReplicaAdapters | None = field(repr=False)

    @property
    def version(self) -> AdapterVersion:
        return self.loaded[0]

    @property
    def uri(self) -> str:
        return f"models:/{self.model_id}"

    def follow(self, period_s: float) -> bool:
        """Re-resolve the alias when the last look is older than ``period_s``; load the version it names now if
        that is another one. True if swapped. A pinned ``NAME/VERSION`` never moves."""
        owner = self.owner
        if owner is None or "@" not in self.model_id or time.monotonic() - self.checked_at < period_s:
            return False
        with owner.lock:
            if time.monotonic() - self.checked_at < period_s:
                return False
            try:
                _, version = resolve_version(self.uri)
            except ModelUriError as err:  # the alias was removed: the adapter is no longer served under it
                raise not_served(self.model_id, err) from None
            except Exception as err:  # the registry is unreachable: keep serving the version held, look again later
                log.warning("alias poll of adapter %s failed, still serving v%s: %s", self.model_id,
                            self.version.version, str(err)[:200])
                self.checked_at = time.monotonic()
                return False
            self.checked_at = time.monotonic()
            if str(version) == self.version.version:
                return False
            old = self.version.key
            self.loaded = owner.read(self.model_id)
            owner.retire(old)
            owner.swaps += 1
            log.warning("hot swap of adapter %s: version %s", self.model_id, self.version.version)
            return True

    def __del__(self):  # Ray Serve's LRU evicted this model id (it calls this), or the object is collected
        owner = getattr(self, "owner", None)
        if owner is not None:
            self.owner = None  # once: a later collection must not retire a reloaded copy of the same version
            owner.retire(self.version.key)


class ReplicaAdapters:
    """The adapters of one model replica on the base its holder serves (module docstring)."""

    def __init__(self, cache_dir: str | Path, poll_s: float):
        self.cache_dir = Path(cache_dir)
        self.poll_s = poll_s
        self.lock = threading.RLock()
        self._slots: tuple[Loaded, AdapterSlots] | None = None
        self._base_sha: dict[tuple[str, str], str] = {}
        self._retired: set[str] = set()
        self._unloadable: dict[str, AdapterRefused] = {}
        """Adapter versions that failed to attach to the current base's UNet, with their refusal (not retried)."""
        self.swaps = 0
        self.loads = 0
        """Adapter versions fetched and read (first loads, reloads after an eviction, hot swaps)."""

    def base_sha256(self, loaded: Loaded) -> str:
        key = (loaded.name, loaded.version)
        if key not in self._base_sha:
            with _file_lock(self.cache_dir / ".fetch.lock"):
                self._base_sha[key] = version_weights_sha256(loaded.name, loaded.version, self.cache_dir)
        return self._base_sha[key]

    def fetch(self, model_id: str) -> ServedAdapter:
        """The adapter version ``model_id`` names now, downloaded and read (blocking: the loader runs it in a
        thread)."""
        return ServedAdapter(model_id, self.read(model_id), time.monotonic(), self)

    def read(self, model_id: str) -> tuple[AdapterVersion, AdapterWeights]:
        try:
            with _file_lock(self.cache_dir / ".fetch.lock"):
                version = fetch_adapter(f"models:/{model_id}", self.cache_dir)
        except ModelUriError as err:  # NotAnAdapter included: a full model's name answers as an unknown one
            raise not_served(model_id, err) from None
        try:
            weights = version.weights()
        except AdapterError as err:
            raise unloadable(version, err) from None
        self.loads += 1
        log.info("loaded adapter %s (v%s, %s, %d bytes)", model_id, version.version, version.method, weights.nbytes)
        return version, weights

    def check_base(self, adapter: ServedAdapter | AdapterVersion, loaded: Loaded) -> None:
        version = adapter.version if isinstance(adapter, ServedAdapter) else adapter
        served = self.base_sha256(loaded)
        if version.base_sha256 != served:
            raise AdapterRefused(
                409, f"adapter {version.name} v{version.version} was trained on {version.base_uri} "
                f"(weights sha256 {version.base_sha256[:12]}); this server's base is models:/{loaded.name}/"
                f"{loaded.version} (weights sha256 {served[:12]})", "adapter_base_mismatch")

    def retire(self, key: str) -> None:
        """Detach ``key`` at the next batch (an eviction or a hot swap; never blocks on a running batch)."""
        self._retired.add(key)

    def slots(self, loaded: Loaded) -> AdapterSlots:
        """The slots of the base version served now: a new base (hot swap) starts without adapters."""
        with self.lock:
            if self._slots is None or self._slots[0] is not loaded:
                self._slots = (loaded, AdapterSlots(loaded.pipelines.t2i.unet))
                self._unloadable = {}
            return self._slots[1]

    @property
    def attached(self) -> list[str]:
        return sorted(self._slots[1].attached) if self._slots is not None else []

    def run(self, loaded: Loaded, adapter: ServedAdapter | None,
            reqs: list[GenerationRequest]) -> list[GenerationResult]:
        """One batch on ``loaded`` with ``adapter`` active (None: the bare base). Batches run one at a time per
        UNet: the active adapter is a property of its shared modules."""
        slots = self.slots(loaded)
        with slots.lock:
            for key in list(self._retired):
                if adapter is None or key != adapter.version.key:
                    slots.drop(key)
                    self._retired.discard(key)
            if adapter is None:
                with slots.running(None):
                    return serve_batch(loaded.name, loaded.version, loaded.pipelines, reqs)
            version, weights = adapter.loaded  # one version for the whole batch
            try:
                self.check_base(version, loaded)
            except AdapterRefused as err:
                return [err.result(r) for r in reqs]
            self._retired.discard(version.key)
            refused = self._unloadable.get(version.key)
            if refused is None:
                try:
                    slots.ensure(version.key, weights)
                except AdapterError as err:  # attach removed what it had added: the base is as it was
                    refused = self._unloadable[version.key] = unloadable(version, err)
            if refused is not None:
                return [refused.result(r) for r in reqs]
            with slots.running(version.key):
                out = serve_batch(version.name, version.version, loaded.pipelines, reqs)
        base = f"{loaded.name}/{loaded.version}"
        for result in out:
            result.base = base
        return out
