"""The one guarded HTTP GET of the platform: every URL it fetches (URL sources' images, http(s) model sources).

Plain urllib3, no Ray and nothing of ours. ``Fetcher.open`` follows redirects itself, hop by hop, and
yields the final answer as a ``Reply`` whose body the caller reads in chunks (into memory or to disk):

- only ``http`` and ``https`` URLs, at every hop (a redirect to ``file:`` or ``ftp:`` is refused);
- at most ``max_redirects`` redirects; each hop's host is checked again;
- a host that resolves to a loopback, private, link-local, reserved, multicast or unspecified address is
  refused before any connection unless ``allow_private_addresses`` (the error names ``private_setting``);
- bodies are asked for with ``Accept-Encoding: identity`` and never decoded; an answer with any other
  ``Content-Encoding`` is refused before its body is read, so what a caller keeps is what the server sent
  and ``max_bytes`` bounds what it takes on disk or in memory;
- a body over ``max_bytes`` is refused by its ``Content-Length`` (nothing read) or while reading;
- deadlines: ``connect_timeout_s`` per connection, ``read_timeout_s`` for the headers and for each read of
  the body, and ``timeout_s`` for the whole request (every hop, the headers and the body). Before each read
  the socket's timeout is cut to what is left of ``timeout_s``, so a server that trickles bytes, or sends
  headers and then nothing, is cut off at the total deadline.

Every failure is a ``FetchError`` with a ``kind`` (what went wrong, for the caller's own reasons), a
one-line ``detail``, and ``retry`` (worth another attempt: a connection error, a timeout, 429 or 5xx).
Retries, per-host concurrency and what a status means are the caller's.

Limit: the private-address check resolves the host before connecting; a DNS server that answers
differently a moment later (DNS rebinding) is not caught.
"""

from __future__ import annotations

import ipaddress
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit
from urllib.request import getproxies_environment, proxy_bypass_environment

import urllib3
from urllib3.exceptions import ConnectTimeoutError, HTTPError, NewConnectionError
from urllib3.exceptions import TimeoutError as Urllib3Timeout

REDIRECTS = (301, 302, 303, 307, 308)
RETRY_STATUS = (429, 500, 502, 503, 504)
SCHEMES = ("http", "https")

REFUSED = "refused"  # a scheme, an address, a redirect or an encoding this policy does not accept
STATUS = "status"  # an answer with a status the caller does not accept
CONNECTION = "connection"  # no connection, or one that broke
TIMEOUT = "timeout"
TOO_LARGE = "too_large"


class FetchError(Exception):
    """A request that gave no usable answer: ``kind`` (one of the constants above), ``detail`` (one line),
    ``retry`` (worth another attempt), ``status`` (the HTTP status, for ``STATUS``)."""

    def __init__(self, kind: str, detail: str, retry: bool = False, status: int | None = None):
        detail = " ".join(detail.split())
        super().__init__(detail)
        self.kind, self.detail, self.retry, self.status = kind, detail, retry, status


@dataclass(frozen=True)
class Limits:
    """What one ``Fetcher`` accepts (see the module's docstring); ``read_timeout_s`` None: the rest of
    ``timeout_s``."""

    timeout_s: float
    connect_timeout_s: float
    max_bytes: int
    max_redirects: int
    allow_private_addresses: bool
    private_setting: str
    read_timeout_s: float | None = None
    chunk_bytes: int = 64 * 1024


def private_address(host: str) -> str | None:
    """The first address of ``host`` that is loopback, private, link-local, reserved, multicast or
    unspecified; None when every address is public. A name that does not resolve gives None: the
    connection then fails on its own."""
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


def is_identity(content_encoding: str | None) -> bool:
    """Whether a ``Content-Encoding`` header leaves the body as it is (absent, empty or ``identity``)."""
    return (content_encoding or "").strip().lower() in ("", "identity")


class Reply:
    """The final answer of ``Fetcher.open``: ``url`` (after redirects), ``status``, ``headers``; the body
    through ``chunks`` or ``read``, bounded by the fetcher's limits and the request's deadline."""

    def __init__(self, fetcher: Fetcher, url: str, resp, deadline: float):
        self.url, self.status, self.headers = url, resp.status, resp.headers
        self._fetcher, self._resp, self._deadline = fetcher, resp, deadline
        self.whole = False  # the body was read to its end: the connection may be reused

    def expect(self, *ok: int) -> None:
        """``FetchError`` (``STATUS``; ``retry`` for 429 and 5xx) unless the status is one of ``ok``."""
        if self.status not in ok:
            raise FetchError(STATUS, f"HTTP {self.status}", retry=self.status in RETRY_STATUS, status=self.status)

    def chunks(self) -> Iterator[bytes]:
        """The body as sent (never decoded), chunk by chunk; ``FetchError`` for a ``Content-Encoding`` other
        than identity, a body over ``max_bytes``, the deadline, or a connection that broke."""
        limits = self._fetcher.limits
        encoding = self.headers.get("Content-Encoding")
        if not is_identity(encoding):
            raise FetchError(REFUSED, f"Content-Encoding {encoding.strip()[:40]!r} although identity was asked "
                                      "for (the body would not be what is stored)")
        length = self.headers.get("Content-Length")
        if length and length.isdigit() and int(length) > limits.max_bytes:
            raise FetchError(TOO_LARGE, f"Content-Length {length} > {limits.max_bytes} bytes")
        total = 0
        while True:
            by_deadline = self._fetcher._arm(self._resp, self._deadline)
            try:
                chunk = self._resp.read1(limits.chunk_bytes)
            except Urllib3Timeout:
                raise self._fetcher._timeout(by_deadline, "while reading the body") from None
            except (HTTPError, OSError) as err:
                raise FetchError(CONNECTION, f"connection broke while reading: {type(err).__name__}",
                                 retry=True) from None
            if not chunk:
                self.whole = True
                return
            total += len(chunk)
            if total > limits.max_bytes:
                raise FetchError(TOO_LARGE, f"body over {limits.max_bytes} bytes")
            yield chunk

    def read(self) -> bytes:
        """The whole body in memory (``chunks`` joined)."""
        return b"".join(self.chunks())


class Fetcher:
    """GETs under one ``Limits``; safe to use from several threads at once. ``headers`` go with every
    request (``Accept-Encoding`` is always ``identity``); ``maxsize``: connections kept per host."""

    def __init__(self, limits: Limits, headers: dict[str, str] | None = None, maxsize: int = 1):
        self.limits = limits
        kwargs = {"num_pools": 64, "maxsize": max(1, maxsize), "retries": False,
                  "headers": {**(headers or {}), "Accept-Encoding": "identity"}}
        self.pool = urllib3.PoolManager(**kwargs)
        # HTTP_PROXY / HTTPS_PROXY / NO_PROXY as read when the fetcher is made (the guards above still check
        # each target URL; the proxy only carries the connection).
        proxies = getproxies_environment()
        self.proxies = {scheme: urllib3.ProxyManager(proxies[scheme], **kwargs)
                        for scheme in SCHEMES if proxies.get(scheme)}

    def close(self) -> None:
        self.pool.clear()
        for proxy in self.proxies.values():
            proxy.clear()

    def _pool_for(self, url: str) -> urllib3.PoolManager:
        """The environment's proxy for ``url``'s scheme unless NO_PROXY names its host, else a direct pool."""
        parts = urlsplit(url)
        proxy = self.proxies.get(parts.scheme)
        return proxy if proxy is not None and not proxy_bypass_environment(parts.netloc) else self.pool

    def check_url(self, url: str) -> str:
        """The host of ``url``, or ``FetchError`` (``REFUSED``) for a scheme other than http(s), no host, or a
        private address while those are not allowed."""
        parts = urlsplit(url)
        if parts.scheme not in SCHEMES or not parts.hostname:
            raise FetchError(REFUSED, f"not an http(s) URL: {url[:200]}")
        if not self.limits.allow_private_addresses:
            private = private_address(parts.hostname)
            if private:
                raise FetchError(REFUSED, f"{parts.hostname} resolves to the private address {private} "
                                          f"({self.limits.private_setting})")
        return parts.hostname

    @contextmanager
    def open(self, url: str, headers: dict[str, str] | None = None,
             slot: Callable[[str], AbstractContextManager] | None = None) -> Iterator[Reply]:
        """The final answer to GET ``url`` after its redirects, each hop checked (``check_url``). ``slot(host)``,
        when given, is held around each hop (for per-host bounds); the deadline starts when the first is held.
        Leaving the block reuses the connection if the body was read whole, else drops it (an unread body
        may be huge or endless: it is never drained)."""
        deadline = None
        current = url
        for _hop in range(self.limits.max_redirects + 1):
            host = self.check_url(current)
            with slot(host) if slot else nullcontext():
                deadline = deadline or time.monotonic() + self.limits.timeout_s
                resp = self._request(current, headers, deadline)
                if resp.status in REDIRECTS:
                    location = resp.headers.get("Location")
                    resp.close()
                    if not location:
                        raise FetchError(REFUSED, f"HTTP {resp.status} without a Location")
                    current = urljoin(current, location)
                    continue
                reply = Reply(self, current, resp, deadline)
                try:
                    yield reply
                finally:
                    if reply.whole:
                        resp.release_conn()
                    else:
                        resp.close()
                return
        raise FetchError(REFUSED, f"more than {self.limits.max_redirects} redirects (a loop?) from {url[:200]}")

    def _timeouts(self, deadline: float) -> tuple[float, bool]:
        """(the read timeout to use now, whether it is the deadline that sets it); ``FetchError`` past it."""
        left = deadline - time.monotonic()
        if left <= 0:
            raise self._timeout(True, "")
        read = self.limits.read_timeout_s
        return (left, True) if read is None or left <= read else (read, False)

    def _timeout(self, by_deadline: bool, where: str) -> FetchError:
        if by_deadline:
            return FetchError(TIMEOUT, f"no complete answer within {self.limits.timeout_s} s", retry=True)
        return FetchError(TIMEOUT, f"no data for {self.limits.read_timeout_s} s {where}".strip(), retry=True)

    def _arm(self, resp, deadline: float) -> bool:
        """Cut the socket's timeout to what is left before a read; whether the deadline sets it."""
        read, by_deadline = self._timeouts(deadline)
        sock = getattr(resp.connection, "sock", None)
        if sock is not None:
            sock.settimeout(read)
        return by_deadline

    def _request(self, url: str, headers: dict[str, str] | None, deadline: float):
        read, by_deadline = self._timeouts(deadline)
        timeout = urllib3.Timeout(connect=min(self.limits.connect_timeout_s, read), read=read)
        try:
            return self._pool_for(url).request("GET", url, headers={**self.pool.headers, **(headers or {}),
                                                                    "Accept-Encoding": "identity"},
                                               preload_content=False, redirect=False, timeout=timeout,
                                               decode_content=False)
        except NewConnectionError as err:  # refused, DNS (urllib3 makes it a kind of timeout error: not here)
            raise FetchError(CONNECTION, f"connection failed: {type(err).__name__}: {str(err)[:200]}",
                             retry=True) from None
        except ConnectTimeoutError:
            raise FetchError(TIMEOUT, f"could not connect within {timeout.connect_timeout} s", retry=True) from None
        except Urllib3Timeout as err:
            raise self._timeout(by_deadline, f"waiting for the answer ({type(err).__name__})") from None
        except HTTPError as err:  # reset, TLS
            raise FetchError(CONNECTION, f"connection failed: {type(err).__name__}: {str(err)[:200]}",
                             retry=True) from None
