"""http(s) model sources against a hostile server on 127.0.0.1 (tests/fixtures/hostile_http.py): every guard
of the shared downloader (components/http_fetch.py) on the model path -- private addresses at each redirect
hop, schemes, redirect loops, the size cap, no transparent decompression, the total deadline -- each
failure one ``ModelLoadError`` line naming the URL, with no file (whole or partial) left behind; and the
ETag cache (304 keeps the copy, a new ETag fetches again)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from components import http_fetch
from components.config.schema import ModelDownloadConfig
from components.diffusion.parts import ModelLoadError
from components.diffusion.sources import fetch_single_file
from components.http_fetch import Fetcher, FetchError, Limits, is_identity
from tests.fixtures.hostile_http import (
    HostileServer,
    chunked,
    cut_short,
    file_with_etag,
    gzipped,
    redirect,
    trickle,
)

BODY = bytes(range(256)) * 64  # 16 KiB standing in for a checkpoint
LOOPBACK = ModelDownloadConfig(allow_private_addresses=True, connect_timeout_s=2, read_timeout_s=5, timeout_s=10)


@pytest.fixture
def server():
    s = HostileServer()
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture
def other():
    """A second server: another port on 127.0.0.1 (what a redirect may point at)."""
    s = HostileServer()
    try:
        yield s
    finally:
        s.stop()


def _files(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.rglob("*") if p.is_file())


def _refused(url: str, cache: Path, cfg: ModelDownloadConfig, words: str) -> str:
    with pytest.raises(ModelLoadError) as info:
        fetch_single_file(url, cache, cfg)
    line = str(info.value)
    assert "\n" not in line and line.startswith(f"model source {url}: ") and words in line, line
    assert not [n for n in _files(cache) if not n.endswith(".etag")], _files(cache)  # nothing half-written
    return line


def test_a_file_is_downloaded_whole_and_kept_while_its_etag_holds(server, tmp_path):
    server.routes["/m/tiny.safetensors"] = file_with_etag(BODY, '"v1"')
    url = server.url("/m/tiny.safetensors")
    path = fetch_single_file(url, tmp_path, LOOPBACK)
    assert path.read_bytes() == BODY and path.name == "tiny.safetensors"
    assert server.seen["/m/tiny.safetensors"]["Accept-Encoding"] == "identity"
    mtime = path.stat().st_mtime_ns
    assert fetch_single_file(url, tmp_path, LOOPBACK) == path and path.stat().st_mtime_ns == mtime  # 304: kept
    assert server.seen["/m/tiny.safetensors"]["If-None-Match"] == '"v1"'
    server.routes["/m/tiny.safetensors"] = file_with_etag(BODY[::-1], '"v2"')  # the file changed
    assert fetch_single_file(url, tmp_path, LOOPBACK).read_bytes() == BODY[::-1]
    assert (path.parent / "tiny.safetensors.etag").read_text() == '"v2"'
    assert _files(tmp_path) == ["tiny.safetensors", "tiny.safetensors.etag"]
    assert server.hits["/m/tiny.safetensors"] == 3


def test_a_loopback_url_is_refused_unless_allowed_without_a_request(server, tmp_path):
    server.routes["/m/tiny.safetensors"] = file_with_etag(BODY, '"v1"')
    url = server.url("/m/tiny.safetensors")
    _refused(url, tmp_path, ModelDownloadConfig(), "private address 127.0.0.1 (model.download.allow_private_addresses)")
    assert server.hits["/m/tiny.safetensors"] == 0


def test_a_redirect_to_another_loopback_port_is_refused(server, other, tmp_path, monkeypatch):
    """A host taken for public (``localhost`` here) redirecting to a service on another port of 127.0.0.1:
    the hop is checked, and the service is never asked."""
    real = http_fetch.private_address
    monkeypatch.setattr(http_fetch, "private_address", lambda host: None if host == "localhost" else real(host))
    other.routes["/secret.safetensors"] = file_with_etag(b"internal", '"s"')
    server.routes["/hop.safetensors"] = redirect(other.url("/secret.safetensors"))
    url = f"http://localhost:{server.port}/hop.safetensors"
    _refused(url, tmp_path, ModelDownloadConfig(), "127.0.0.1 resolves to the private address 127.0.0.1")
    assert server.hits["/hop.safetensors"] == 1 and other.hits["/secret.safetensors"] == 0


def test_allowed_redirects_are_followed_but_never_off_http(server, other, tmp_path):
    other.routes["/real.safetensors"] = file_with_etag(BODY, '"r"')
    server.routes["/hop/tiny.safetensors"] = redirect(other.url("/real.safetensors"), 307)
    assert fetch_single_file(server.url("/hop/tiny.safetensors"), tmp_path / "ok", LOOPBACK).read_bytes() == BODY
    server.routes["/to-file.safetensors"] = redirect("file:///etc/passwd")
    _refused(server.url("/to-file.safetensors"), tmp_path / "refused", LOOPBACK,
             "not an http(s) URL: file:///etc/passwd")
    server.routes["/ftp.safetensors"] = redirect("ftp://127.0.0.1/x.safetensors")
    _refused(server.url("/ftp.safetensors"), tmp_path / "refused", LOOPBACK, "not an http(s) URL")
    server.routes["/loop.safetensors"] = redirect("/loop.safetensors")
    _refused(server.url("/loop.safetensors"), tmp_path / "refused", LOOPBACK, "more than 5 redirects")
    assert server.hits["/loop.safetensors"] == 6


@pytest.mark.parametrize(("route", "words"), [
    (lambda s: file_with_etag(b"\x02" * 5000, '"big"'), "Content-Length 5000 > 4096 bytes"),
    (lambda s: chunked(50_000, chunk=1024), "body over 4096 bytes"),
])
def test_a_file_over_the_cap_is_refused_and_nothing_kept(server, tmp_path, route, words):
    server.routes["/big.safetensors"] = route(server)
    _refused(server.url("/big.safetensors"), tmp_path, LOOPBACK.model_copy(update={"max_bytes": 4096}), words)


def test_a_compressed_answer_is_refused_not_inflated(server, tmp_path):
    """A server that gzips although identity was asked for: 300 KB of zeros would be 300 MB decoded. Nothing
    is inflated and nothing is stored: a file on disk is always the bytes the server sent, uncompressed."""
    server.routes["/z.safetensors"] = gzipped(b"\x00" * 2**20)
    _refused(server.url("/z.safetensors"), tmp_path, LOOPBACK, "Content-Encoding 'gzip'")
    assert server.seen["/z.safetensors"]["Accept-Encoding"] == "identity"


@pytest.mark.parametrize("every_s", [0.5, 0])  # one byte every 0.5 s; headers, then nothing
def test_a_trickling_server_is_cut_off_at_the_total_deadline(server, tmp_path, every_s):
    server.routes["/slow.safetensors"] = trickle(server, every_s)
    cfg = LOOPBACK.model_copy(update={"timeout_s": 2.0, "read_timeout_s": 30.0})
    start = time.monotonic()
    _refused(server.url("/slow.safetensors"), tmp_path, cfg, "no complete answer within 2.0 s")
    assert 1.9 < time.monotonic() - start < 3.5  # the deadline, not the 30 s read timeout


def test_a_connection_cut_short_leaves_no_file_and_keeps_the_old_copy(server, tmp_path):
    server.routes["/m/tiny.safetensors"] = file_with_etag(BODY, '"v1"')
    url = server.url("/m/tiny.safetensors")
    path = fetch_single_file(url, tmp_path, LOOPBACK)
    server.routes["/m/tiny.safetensors"] = cut_short(b"\x03" * 100, promised=len(BODY))
    with pytest.raises(ModelLoadError, match="connection broke while reading"):
        fetch_single_file(url, tmp_path, LOOPBACK)
    assert path.read_bytes() == BODY and _files(tmp_path) == ["tiny.safetensors", "tiny.safetensors.etag"]


def test_an_error_status_and_a_credential_in_the_url_are_one_redacted_line(server, tmp_path):
    token = "hf_" + "a1B2" * 9
    url = server.url(f"/gone.safetensors?token={token}")
    with pytest.raises(ModelLoadError, match="the server answered 404") as info:
        fetch_single_file(url, tmp_path, LOOPBACK)
    assert token not in str(info.value) and str(info.value).startswith("model source http://127.0.0.1:")


def test_the_shared_core_refuses_before_connecting_and_reads_identity_only():
    fetcher = Fetcher(Limits(timeout_s=1, connect_timeout_s=1, max_bytes=10, max_redirects=0,
                             allow_private_addresses=False, private_setting="x.allow"))
    for url, words in [("file:///etc/passwd", "not an http(s) URL"), ("http:///nohost", "not an http(s) URL"),
                       ("http://127.0.0.1:9/a", "private address 127.0.0.1 (x.allow)"),
                       ("http://[::1]:9/a", "private address ::1"), ("http://169.254.169.254/", "169.254.169.254")]:
        with pytest.raises(FetchError, match=words.replace("(", r"\(").replace(")", r"\)")) as info:
            fetcher.check_url(url)
        assert info.value.kind == "refused" and not info.value.retry
    assert is_identity(None) and is_identity(" Identity ") and not is_identity("gzip") and not is_identity("br")


def test_a_proxy_from_the_environment_carries_the_download_and_no_proxy_bypasses_it(server, other, tmp_path,
                                                                                      monkeypatch):
    """HTTP_PROXY is honoured (the proxy gets the absolute URL), the target still passes the guards, and a host
    NO_PROXY names is fetched directly."""
    target = other.url("/model.safetensors")
    server.routes[target] = file_with_etag(BODY, '"p1"')  # the proxy answers for the target
    monkeypatch.setenv("HTTP_PROXY", server.url(""))
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    path = fetch_single_file(target, tmp_path / "a", LOOPBACK)
    assert path.read_bytes() == BODY and server.hits[target] == 1 and other.hits["/model.safetensors"] == 0

    other.routes["/model.safetensors"] = file_with_etag(BODY[:100], '"d1"')
    monkeypatch.setenv("NO_PROXY", f"127.0.0.1:{other.port}")
    assert fetch_single_file(target, tmp_path / "b", LOOPBACK).read_bytes() == BODY[:100]
    assert server.hits[target] == 1 and other.hits["/model.safetensors"] == 1
