"""The served model version: loaded through the registry, swapped atomically when its alias moves.

The holder keeps one immutable :class:`Loaded` (name, version, pipelines). A request (or a whole
dynamic batch) takes that reference once and uses it to the end, so swapping the reference can
never change a request half-way: requests that started on version 1 finish on version 1, later
ones run on version 2, and none fails. The new version is downloaded and built on the polling
thread while the old one keeps serving (a blocking ``reconfigure`` would stall the replica instead).

A version that fails to load (deleted, broken artifacts) is remembered: it is tried again only after an
exponential backoff (``period * 2**failures``, at most ``BACKOFF_MAX_S``), and the replica keeps serving
what it has. A failing registry backs the poll itself off the same way. A new replica whose alias names
such a version starts on the last version this node loaded well (recorded in the cache directory), else
on the alias's ``previous`` (the version a promotion replaced), so a scale-up or a restart after a bad
promotion is not an outage.

Nothing here knows about Ray; Serve wires it in ``deploy/app.py``.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from components.config import InferenceConfig
from components.diffusion.pipelines import ZTSNRPipelines, build_pipelines
from components.diffusion.request import GenerationRequest
from components.diffusion.schedule import inference_scheduler
from components.redact import redact
from components.registry.model import diffusion_from_pipeline_dir, fetch_model, parse_model_uri, resolve_version
from components.registry.promotion import previous_alias

log = logging.getLogger(__name__)

BACKOFF_MAX_S = 600.0
"""The longest wait before a version that failed to load is tried again (and between polls of a
registry that keeps failing)."""
LAST_GOOD = "last-good.json"
"""In the cache directory: model URI -> [name, version] of the last version loaded well on this node."""


class NotReady(RuntimeError):
    pass


class KnownBad(RuntimeError):
    """The alias names a version that failed to load, and its backoff has not run out: not tried again yet."""


class LoadFailed(RuntimeError):
    """The version the URI names could not be downloaded or built (remembered in ``ModelHolder.bad``)."""


@dataclass
class BadVersion:
    failures: int
    retry_at: float  # time.monotonic()
    why: str


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

    def __init__(self, uri: str, cache_dir: str | Path, defaults: InferenceConfig, period_s: float = 2.0,
                 backoff_max_s: float = BACKOFF_MAX_S, compile_backend: str | None = None,
                 warmup: GenerationRequest | None = None):
        parse_model_uri(uri)  # a malformed URI fails here, before any download
        self.uri = uri
        self.cache_dir = Path(cache_dir)
        self.defaults = defaults
        self.period_s = period_s
        self.backoff_max_s = backoff_max_s
        self._current: Loaded | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.swaps = 0
        self.bad: dict[str, BadVersion] = {}
        """Versions that failed to load, with when to try each again."""
        self.compile_backend = compile_backend
        """Compile each loaded version's UNet with this ``torch.compile`` backend (None: eager)."""
        self.warmup = warmup
        """Generated once by each loaded version before it serves (the compilation happens there)."""

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
        if self.compile_backend:
            pipes.compile(self.compile_backend)
        if self.warmup is not None:
            start = time.perf_counter()
            pipes.generate_group([self.warmup])
            log.info("%s version %s warmed up in %.1f s", resolved.name, resolved.version, time.perf_counter() - start)
        return Loaded(resolved.name, resolved.version, pipes)

    def _load_or_remember(self, name: str, version: str) -> Loaded:
        """``load``, remembering a failure: the version is not tried again before its backoff runs out."""
        bad = self.bad.get(version)
        if bad is not None and time.monotonic() < bad.retry_at:
            raise KnownBad(f"version {version} failed to load {bad.failures} time(s) ({bad.why}); next try in "
                           f"{bad.retry_at - time.monotonic():.0f} s")
        try:
            loaded = self.load(name, version)
        except Exception as err:
            failures = bad.failures + 1 if bad is not None else 1
            delay = min(self.period_s * 2**failures, self.backoff_max_s)
            first_line = (str(err).strip().splitlines() or [""])[0]
            why = redact(f"{type(err).__name__}: {first_line}")[:300]
            self.bad[version] = BadVersion(failures, time.monotonic() + delay, why)
            log.warning("%s: version %s failed to load (%s); still serving version %s, next try in %.0f s",
                        self.uri, version, why, self._current.version if self._current else None, delay)
            raise LoadFailed(f"{self.uri}: version {version} failed to load ({why})") from err
        self.bad.pop(version, None)
        self._remember_good(loaded)
        return loaded

    def refresh(self) -> bool:
        """Resolve the URI now; load and swap in the version it names if that is new. True if swapped.
        Raises ``KnownBad`` (without a download) for a version still in its backoff."""
        name, version = resolve_version(self.uri)
        old = self._current
        if old is not None and old.version == str(version):
            return False
        loaded = self._load_or_remember(name, str(version))
        self._current = loaded  # the swap: a single reference assignment
        if old is not None:
            self.swaps += 1
            log.warning("hot swap %s: version %s -> %s", self.uri, old.version, loaded.version)
        return True

    def start(self) -> None:
        """The first load of a replica: the version the URI names; if that cannot be loaded (a broken or
        deleted version, a registry error), the last version this node loaded well, else the alias's
        ``previous``. Raises only when none of them loads: then there is nothing to serve."""
        try:
            self.refresh()
            return
        except Exception as err:
            first = err
        for name, version, where in self._fallbacks():
            try:
                self._current = self._load_or_remember(name, version)
            except (KnownBad, LoadFailed):  # logged by _load_or_remember; try the next candidate
                continue
            log.warning("%s could not be loaded (%s); serving version %s (%s) until it names one that loads",
                        self.uri, redact(str(first))[:300], version, where)
            return
        raise first

    def _fallbacks(self) -> list[tuple[str, str, str]]:
        """(name, version, where from) a starting replica may serve when the URI's own version fails."""
        out = []
        good = self._read_last_good().get(self.uri)
        if good:
            out.append((good[0], str(good[1]), "the last version this node loaded well"))
        name, alias, _ = parse_model_uri(self.uri)
        if alias is not None:
            try:
                prev = resolve_version(f"models:/{name}@{previous_alias(alias)}")
                out.append((prev[0], prev[1], f"@{previous_alias(alias)}"))
            except Exception as err:  # no previous alias, or the registry is down: nothing more to try
                log.info("no @%s to fall back on: %s", previous_alias(alias), err)
        seen, unique = set(), []
        for entry in out:
            if entry[1] not in seen and entry[1] not in self.bad:
                seen.add(entry[1])
                unique.append(entry)
        return unique

    def _read_last_good(self) -> dict:
        try:
            return json.loads((self.cache_dir / LAST_GOOD).read_text())
        except (OSError, ValueError):
            return {}

    def _remember_good(self, loaded: Loaded) -> None:
        """Record ``loaded`` as this URI's last good version (atomic replace; replicas on a node share it)."""
        try:
            with _file_lock(self.cache_dir / ".last-good.lock"):
                record = {**self._read_last_good(), self.uri: [loaded.name, loaded.version]}
                fd, tmp = tempfile.mkstemp(dir=self.cache_dir, prefix=".last-good-")
                with os.fdopen(fd, "w") as fh:
                    json.dump(record, fh)
                os.replace(tmp, self.cache_dir / LAST_GOOD)
        except OSError as err:  # a read-only cache costs the fallback, never the load
            log.warning("could not record the last good version in %s: %s", self.cache_dir, err)

    def start_polling(self, period_s: float | None = None) -> None:
        """Follow the alias every ``period_s`` seconds (default: the holder's) on a daemon thread; pinned
        versions do not move."""
        if period_s is not None:
            self.period_s = period_s
        if not self.follows_alias or self.period_s <= 0 or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._poll, name="alias-poller", daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        delay = self.period_s
        while not self._stop.wait(delay):
            try:
                self.refresh()
                delay = self.period_s
            except (KnownBad, LoadFailed):
                # Logged where it failed; its version waits out its own backoff while the alias is still
                # read at the normal pace, so a fix (a promotion, a rollback) is picked up at once.
                delay = self.period_s
            except Exception as err:  # the registry may be unreachable: keep serving, ask less often
                delay = min(delay * 2, self.backoff_max_s)
                log.warning("alias poll of %s failed, still serving version %s; next poll in %.0f s: %s", self.uri,
                            self._current.version if self._current else None, delay, redact(str(err))[:300])

    def stop(self) -> None:
        self._stop.set()
