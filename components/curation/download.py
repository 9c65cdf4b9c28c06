"""Downloading one image by URL for URL sources: bounded, with timeouts, retries and size and type checks.

Plain Python on urllib3, no Ray: ``process.Curator`` calls it from a small thread pool inside each
curation task, so the Ray Data pipeline, the unit tests and a loop run the same code. Every failure
is a ``DownloadFailed`` carrying the reason the record is counted under; nothing here stops a run.

- ``http_error``: a 4xx or 5xx answer (5xx and 429 after the retries), a connection that could not be
  made, more than ``max_redirects`` redirects (a loop), a scheme other than http(s), or a host that
  resolves to a private address while ``allow_private_addresses`` is off.
- ``timeout``: an attempt that took longer than ``timeout_s`` in all (connect, headers and body: a
  server that sends one byte a second cannot hold a task), after the retries.
- ``too_large``: a body over ``max_bytes``, by its ``Content-Length`` (nothing is read) or while reading.
- ``not_an_image``: a ``Content-Type`` that is not ``image/*`` (the body is not read).

Retries (connection errors, timeouts, 429, 5xx; never another 4xx) wait ``backoff_s * 2**k`` plus up to
50% jitter. The request itself is ``components.http_fetch`` (the platform's one guarded downloader, also
used for http(s) model sources): redirects followed hop by hop, each hop's host checked and counted
against its own per-host limit; bodies asked for with ``Accept-Encoding: identity`` and read undecoded
(an answer with another ``Content-Encoding`` is an ``http_error``), so ``max_bytes`` bounds the memory a
response can take.

Limit: the private-address check resolves the host before connecting; a DNS server that answers
differently a moment later (DNS rebinding) is not caught. Keep workers without credentials on their
metadata endpoint where that matters.
"""

from __future__ import annotations

import random
import threading
import time
from collections import defaultdict

from components.config import DownloadConfig
from components.curation.filters import Reason
from components.http_fetch import TIMEOUT, TOO_LARGE, Fetcher, FetchError, Limits

REASONS = {TIMEOUT: Reason.TIMEOUT, TOO_LARGE: Reason.TOO_LARGE}
"""The reason a ``FetchError`` kind is counted under; every other kind is ``http_error``."""


class DownloadFailed(Exception):
    """A URL that gave no image: ``reason`` is what the record is counted under."""

    def __init__(self, reason: Reason, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class _Retry(DownloadFailed):
    """A failure worth another attempt (connection error, timeout, 429, 5xx)."""


class Downloader:
    """One per curation task; safe to call from several threads at once.

    ``per_host``: requests in flight to one host from this downloader (the task's share of
    ``download.max_per_host``); the connection pool keeps at most that many connections per host.
    """

    def __init__(self, cfg: DownloadConfig, per_host: int, rng: random.Random | None = None):
        self.cfg = cfg
        self.per_host = max(1, per_host)
        limits = Limits(timeout_s=cfg.timeout_s, connect_timeout_s=cfg.connect_timeout_s, max_bytes=cfg.max_bytes,
                        max_redirects=cfg.max_redirects, allow_private_addresses=cfg.allow_private_addresses,
                        private_setting="curate.download.allow_private_addresses")
        self.fetcher = Fetcher(limits, headers={"User-Agent": cfg.user_agent, "Accept": "image/*"},
                               maxsize=self.per_host)
        self._hosts: dict[str, threading.BoundedSemaphore] = defaultdict(
            lambda: threading.BoundedSemaphore(self.per_host))
        self._lock = threading.Lock()
        self._rng = rng or random.Random()

    def _host_slot(self, host: str) -> threading.BoundedSemaphore:
        with self._lock:
            return self._hosts[host]

    def get(self, url: str) -> bytes:
        """The body of ``url`` (an image by its Content-Type, at most ``max_bytes``), or ``DownloadFailed``."""
        last: _Retry | None = None
        for attempt in range(self.cfg.retries + 1):
            if attempt:
                time.sleep(self.cfg.backoff_s * 2 ** (attempt - 1) * (1 + 0.5 * self._rng.random()))
            try:
                return self._attempt(url)
            except _Retry as err:
                last = err
        assert last is not None
        attempts = self.cfg.retries + 1
        raise DownloadFailed(last.reason, f"{last.detail} ({attempts} attempt{'s' if attempts > 1 else ''})")

    def _attempt(self, url: str) -> bytes:
        """One attempt; the host's slot is held around each hop, and the attempt's deadline runs from the
        first moment it holds one (waiting for a slot is not slowness)."""
        try:
            with self.fetcher.open(url, slot=self._host_slot) as reply:
                reply.expect(200)
                kind = (reply.headers.get("Content-Type") or "").split(";")[0].strip().lower()
                if not kind.startswith("image/"):
                    raise DownloadFailed(Reason.NOT_AN_IMAGE, f"Content-Type {kind or 'missing'!r}, not image/*")
                return reply.read()
        except FetchError as err:
            reason = REASONS.get(err.kind, Reason.HTTP_ERROR)
            raise (_Retry if err.retry else DownloadFailed)(reason, err.detail) from None
