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
50% jitter. Redirects are followed here, hop by hop, so each hop's host is checked and counted against
its own per-host limit. Bodies are requested without compression (``Accept-Encoding: identity``) and read
undecoded, so ``max_bytes`` bounds the memory a response can take.

Limit: the private-address check resolves the host before connecting; a DNS server that answers
differently a moment later (DNS rebinding) is not caught. Keep workers without credentials on their
metadata endpoint where that matters.
"""

from __future__ import annotations

import ipaddress
import random
import socket
import threading
import time
from collections import defaultdict
from urllib.parse import urljoin, urlsplit

import urllib3
from urllib3.exceptions import HTTPError, NewConnectionError
from urllib3.exceptions import TimeoutError as Urllib3Timeout

from components.config import DownloadConfig
from components.curation.filters import Reason

REDIRECTS = (301, 302, 303, 307, 308)
RETRY_STATUS = (429, 500, 502, 503, 504)
CHUNK = 64 * 1024


class DownloadFailed(Exception):
    """A URL that gave no image: ``reason`` is what the record is counted under."""

    def __init__(self, reason: Reason, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class _Retry(DownloadFailed):
    """A failure worth another attempt (connection error, timeout, 429, 5xx)."""


def private_address(host: str) -> str | None:
    """The first address of ``host`` that is loopback, private, link-local, reserved, multicast or
    unspecified; None when every address is public. A name that does not resolve gives None: the
    connection then fails on its own and is counted as ``http_error``."""
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return None
    for info in infos:
        addr = ipaddress.ip_address(info[4][0].split("%")[0])
        if addr.is_private or addr.is_loopback or addr.is_link_local or addr.is_reserved or addr.is_multicast \
                or addr.is_unspecified:
            return str(addr)
    return None


class Downloader:
    """One per curation task; safe to call from several threads at once.

    ``per_host``: requests in flight to one host from this downloader (the task's share of
    ``download.max_per_host``); the connection pool keeps at most that many connections per host.
    """

    def __init__(self, cfg: DownloadConfig, per_host: int, rng: random.Random | None = None):
        self.cfg = cfg
        self.per_host = max(1, per_host)
        self.pool = urllib3.PoolManager(num_pools=64, maxsize=self.per_host, retries=False,
                                        headers={"User-Agent": cfg.user_agent, "Accept-Encoding": "identity",
                                                 "Accept": "image/*"})
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
        deadline = None  # from the first moment this attempt holds its host's slot: waiting for it is not slowness
        current = url
        for _hop in range(self.cfg.max_redirects + 1):
            parts = urlsplit(current)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise DownloadFailed(Reason.HTTP_ERROR, f"not an http(s) URL: {current[:200]}")
            if not self.cfg.allow_private_addresses:
                private = private_address(parts.hostname)
                if private:
                    raise DownloadFailed(Reason.HTTP_ERROR, f"{parts.hostname} resolves to the private address "
                                                            f"{private} (curate.download.allow_private_addresses)")
            with self._host_slot(parts.hostname):
                deadline = deadline or time.monotonic() + self.cfg.timeout_s
                answer = self._request(current, deadline)
            if isinstance(answer, bytes):
                return answer
            current = urljoin(current, answer)
        raise DownloadFailed(Reason.HTTP_ERROR,
                             f"more than {self.cfg.max_redirects} redirects (a loop?) from {url[:200]}")

    def _remaining(self, deadline: float) -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise _Retry(Reason.TIMEOUT, f"no complete answer within {self.cfg.timeout_s} s")
        return left

    def _request(self, url: str, deadline: float) -> bytes | str:
        """One request: the body (bytes), or the next URL of a redirect (str)."""
        left = self._remaining(deadline)
        timeout = urllib3.Timeout(connect=min(self.cfg.connect_timeout_s, left), read=left)
        try:
            resp = self.pool.request("GET", url, preload_content=False, redirect=False, timeout=timeout,
                                     decode_content=False)
        except NewConnectionError as err:  # refused, DNS (urllib3 makes it a kind of timeout error: not here)
            raise _Retry(Reason.HTTP_ERROR, f"connection failed: {type(err).__name__}: {str(err)[:200]}") from None
        except Urllib3Timeout as err:
            raise _Retry(Reason.TIMEOUT, f"{type(err).__name__} after {self.cfg.timeout_s} s at most") from None
        except HTTPError as err:  # reset, TLS
            raise _Retry(Reason.HTTP_ERROR, f"connection failed: {type(err).__name__}: {str(err)[:200]}") from None
        whole = False  # the body was read to its end: the connection can go back to the pool
        try:
            if resp.status in REDIRECTS:
                location = resp.headers.get("Location")
                if not location:
                    raise DownloadFailed(Reason.HTTP_ERROR, f"HTTP {resp.status} without a Location")
                return location
            if resp.status in RETRY_STATUS:
                raise _Retry(Reason.HTTP_ERROR, f"HTTP {resp.status}")
            if resp.status != 200:
                raise DownloadFailed(Reason.HTTP_ERROR, f"HTTP {resp.status}")
            kind = (resp.headers.get("Content-Type") or "").split(";")[0].strip().lower()
            if not kind.startswith("image/"):
                raise DownloadFailed(Reason.NOT_AN_IMAGE, f"Content-Type {kind or 'missing'!r}, not image/*")
            length = resp.headers.get("Content-Length")
            if length and length.isdigit() and int(length) > self.cfg.max_bytes:
                raise DownloadFailed(Reason.TOO_LARGE, f"Content-Length {length} > {self.cfg.max_bytes} bytes")
            body = self._body(resp, deadline)
            whole = True
            return body
        finally:
            if whole:
                resp.release_conn()
            else:  # an unread or cut body: never drain it (it may be huge or endless), drop the connection
                resp.close()

    def _body(self, resp, deadline: float) -> bytes:
        chunks, total = [], 0
        try:
            while True:
                self._remaining(deadline)
                chunk = resp.read1(CHUNK)
                if not chunk:
                    break
                total += len(chunk)
                if total > self.cfg.max_bytes:
                    raise DownloadFailed(Reason.TOO_LARGE, f"body over {self.cfg.max_bytes} bytes")
                chunks.append(chunk)
        except Urllib3Timeout as err:
            raise _Retry(Reason.TIMEOUT, f"{type(err).__name__} while reading the body") from None
        except (HTTPError, OSError) as err:
            raise _Retry(Reason.HTTP_ERROR, f"connection broke while reading: {type(err).__name__}") from None
        return b"".join(chunks)
