"""The served model version: loaded through the registry, swapped atomically when its alias moves.

The holder keeps one immutable :class:`Loaded` (name, version, pipelines). A request (or a whole
dynamic batch) takes that reference once and uses it to the end, so swapping the reference can
never change a request half-way: requests that started on version 1 finish on version 1, later
ones run on version 2, and none fails. The new version is downloaded and built on the polling
thread while the old one keeps serving (a blocking ``reconfigure`` would stall the replica instead).

Nothing here knows about Ray; Serve wires it in ``deploy/app.py``.
"""

from __future__ import annotations

import fcntl
import logging
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from components.config import InferenceConfig
from components.diffusion.pipelines import ZTSNRPipelines, build_pipelines
from components.diffusion.schedule import inference_scheduler
from components.registry.model import diffusion_from_pipeline_dir, fetch_model, parse_model_uri, resolve_version

log = logging.getLogger(__name__)


class NotReady(RuntimeError):
    pass


@dataclass(frozen=True)
class Loaded:
    name: str
    version: str
    pipelines: ZTSNRPipelines = field(repr=False)
    loaded_at: float = field(default_factory=time.time)


@contextmanager
def _file_lock(path: Path):
    """Serialise downloads into the cache shared by the replicas on one node: ``fetch_model`` is safe
    under concurrency (each caller downloads into its own temporary directory), but without the lock
    every replica that starts at once would download the same version."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class ModelHolder:
    """Loads ``models:/NAME@ALIAS`` (or a pinned ``models:/NAME/VERSION``) and follows the alias."""

    def __init__(self, uri: str, cache_dir: str | Path, defaults: InferenceConfig):
        parse_model_uri(uri)  # a malformed URI fails here, before any download
        self.uri = uri
        self.cache_dir = Path(cache_dir)
        self.defaults = defaults
        self._current: Loaded | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.swaps = 0

    @property
    def follows_alias(self) -> bool:
        return parse_model_uri(self.uri)[1] is not None

    @property
    def ready(self) -> bool:
        return self._current is not None

    @property
    def current(self) -> Loaded:
        loaded = self._current  # one read: the caller keeps this reference for its whole request
        if loaded is None:
            raise NotReady(f"{self.uri} is not loaded yet")
        return loaded

    def load(self, name: str, version: str) -> Loaded:
        with _file_lock(self.cache_dir / ".fetch.lock"):
            resolved = fetch_model(f"models:/{name}/{version}", self.cache_dir)
        scheduler = inference_scheduler(diffusion_from_pipeline_dir(resolved.pipeline_dir))
        pipes = build_pipelines(str(resolved.pipeline_dir), scheduler, self.defaults.model_dump())
        return Loaded(resolved.name, resolved.version, pipes)

    def refresh(self) -> bool:
        """Resolve the URI now; load and swap in the version it names if that is new. True if swapped."""
        name, version = resolve_version(self.uri)
        old = self._current
        if old is not None and old.version == str(version):
            return False
        loaded = self.load(name, str(version))
        self._current = loaded  # the swap: a single reference assignment
        if old is not None:
            self.swaps += 1
            log.warning("hot swap %s: version %s -> %s", self.uri, old.version, loaded.version)
        return True

    def start_polling(self, period_s: float) -> None:
        """Follow the alias every ``period_s`` seconds on a daemon thread (pinned versions do not move)."""
        if not self.follows_alias or period_s <= 0 or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._poll, args=(period_s,), name="alias-poller", daemon=True)
        self._thread.start()

    def _poll(self, period_s: float) -> None:
        while not self._stop.wait(period_s):
            try:
                self.refresh()
            except Exception as err:  # the registry may be briefly unreachable: keep serving what we have
                log.warning("alias poll of %s failed, still serving version %s: %s", self.uri,
                            self._current.version if self._current else None, err)

    def stop(self) -> None:
        self._stop.set()
