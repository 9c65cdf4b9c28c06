"""URL downloads against a real HTTP server on 127.0.0.1 (tests/fixtures/http_images.py): every failure is
counted under its reason, retries recover a flaky host, redirects are followed and loops refused, the body is
bounded, per-host concurrency is bounded, private addresses are refused unless allowed."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from components.config import DownloadConfig
from components.curation.download import Downloader, DownloadFailed
from components.curation.filters import Reason
from tests.fixtures.hostile_http import HostileServer, gzipped
from tests.fixtures.http_images import HOLD_S

FAST = DownloadConfig(timeout_s=1.0, connect_timeout_s=1.0, retries=1, backoff_s=0.05, max_bytes=2 * 2**20,
                      max_redirects=3, allow_private_addresses=True)


def _fails(downloader: Downloader, url: str) -> DownloadFailed:
    with pytest.raises(DownloadFailed) as info:
        downloader.get(url)
    return info.value


def test_photos_download_whole_and_a_redirect_is_followed(image_server):
    d = Downloader(FAST, per_host=4)
    data = d.get(image_server.url("/img/astronaut.png"))
    assert data == (image_server.photos / "astronaut.png").read_bytes()
    assert d.get(image_server.url("/redirect/rocket.jpg")) == (image_server.photos / "rocket.jpg").read_bytes()


def test_a_flaky_host_is_retried_with_backoff(image_server):
    image_server.reset()
    d = Downloader(FAST, per_host=4)
    assert d.get(image_server.url("/flaky/coffee.png")) == (image_server.photos / "coffee.png").read_bytes()
    assert image_server.hits["/flaky/coffee.png"] == 2  # 503, then the photo
    no_retry = Downloader(FAST.model_copy(update={"retries": 0}), per_host=4)
    failure = _fails(no_retry, image_server.url("/flaky/chelsea.png"))
    assert failure.reason is Reason.HTTP_ERROR and "503" in failure.detail


@pytest.mark.parametrize(("path", "reason", "words"), [
    ("/404", Reason.HTTP_ERROR, "HTTP 404"),
    ("/500", Reason.HTTP_ERROR, "HTTP 500 (2 attempts)"),
    ("/loop", Reason.HTTP_ERROR, "redirects"),
    ("/slow", Reason.TIMEOUT, "attempts"),
    ("/trickle", Reason.TIMEOUT, "within 1.0 s"),
    ("/big", Reason.TOO_LARGE, "Content-Length 52428800"),
    ("/big-chunked", Reason.TOO_LARGE, "body over"),
    ("/html", Reason.NOT_AN_IMAGE, "text/html"),
])
def test_each_failure_is_its_reason(image_server, path, reason, words):
    image_server.reset()
    start = time.monotonic()
    failure = _fails(Downloader(FAST, per_host=4), image_server.url(path))
    assert failure.reason is reason and words in failure.detail, failure.detail
    assert time.monotonic() - start < 5  # bounded: 2 attempts of at most 1 s, plus backoff
    if reason is not Reason.TIMEOUT and path != "/500" and path != "/loop":
        assert image_server.hits[path] == 1  # not a retried failure


def test_connection_refused_and_odd_schemes_are_http_errors(image_server):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    d = Downloader(FAST, per_host=2)
    assert _fails(d, f"http://127.0.0.1:{port}/x.png").reason is Reason.HTTP_ERROR
    assert _fails(d, "file:///etc/passwd").reason is Reason.HTTP_ERROR
    assert _fails(d, "ftp://example.com/a.png").reason is Reason.HTTP_ERROR


def test_private_addresses_are_refused_by_default_without_a_request(image_server):
    image_server.reset()
    d = Downloader(DownloadConfig(), per_host=2)
    failure = _fails(d, image_server.url("/img/astronaut.png"))
    assert failure.reason is Reason.HTTP_ERROR and "private address 127.0.0.1" in failure.detail
    assert image_server.hits["/img/astronaut.png"] == 0


def test_requests_to_one_host_are_bounded(image_server):
    """12 threads fetching from one host through one downloader allowing 2 per host: the server never has
    more than 2 requests at once, and every photo arrives."""
    image_server.reset()
    d = Downloader(FAST, per_host=2)
    got, start = [], time.monotonic()

    def fetch(i: int):
        got.append(len(d.get(image_server.url(f"/hold/camera.png?{i}"))))

    threads = [threading.Thread(target=fetch, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert got == [(image_server.photos / "camera.png").stat().st_size] * 12
    assert image_server.peak == 2 and time.monotonic() - start >= 6 * HOLD_S


def test_a_compressed_answer_is_an_http_error_never_inflated():
    """The request asks for identity; a server that gzips anyway is refused (not retried, not decoded), so
    ``max_bytes`` bounds what a body can become."""
    server = HostileServer()
    try:
        server.routes["/z.png"] = gzipped(b"\x00" * 2**20, "image/png")
        failure = _fails(Downloader(FAST, per_host=2), server.url("/z.png"))
        assert failure.reason is Reason.HTTP_ERROR and "Content-Encoding 'gzip'" in failure.detail
        assert server.hits["/z.png"] == 1 and server.seen["/z.png"]["Accept-Encoding"] == "identity"
    finally:
        server.stop()
