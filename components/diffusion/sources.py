"""Model sources (``model.source``): what kind each is, where it is read, and what it is made of.

Kinds: ``tiny`` and ``sdxl-random`` (built offline: ``components.diffusion.tiny``), a local diffusers
directory, a Hugging Face hub id (``model.revision``, ``model.variant``), an ``s3://`` prefix fetched into a
local cache (``components.storage.fetch_prefix``), or a single-file ``.safetensors`` checkpoint in the
original SDXL layout -- a local path, an ``s3://`` object or an http(s) URL, fetched into the cache (a URL
through the guarded downloader ``components.http_fetch``, within ``model.download``).
Registered versions (``models:/``) are resolved a layer up, by the registry
(``components.registry.model_sources``), into a directory.

``describe_source`` says what a source is made of, for the lineage of a run: the kind, the resolved hub
commit, and a content hash of the weight files (``weights_sha256``).
"""

from __future__ import annotations

import hashlib
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import StableDiffusionXLPipeline

from components.config import ModelConfig
from components.config.schema import ModelDownloadConfig
from components.diffusion.parts import ModelLoadError, SDXLParts
from components.diffusion.sdxl_base import COMPONENTS, build_component, weight_files
from components.diffusion.source_kinds import (
    SDXL_RANDOM,
    hub_offline,
    source_kind,
)
from components.diffusion.tiny import build_tiny
from components.host_memory import release_memory
from components.http_fetch import Fetcher, FetchError, Limits
from components.redact import redact
from components.storage import fetch_object, fetch_prefix, is_s3

USER_AGENT = "terminus-models/0.1"


def resolve_source(source: str, cache_dir: str | Path) -> str:
    """A local directory for s3:// sources (downloaded into ``cache_dir/s3``); anything else as is."""
    if is_s3(source):
        try:
            return str(fetch_prefix(source, Path(cache_dir) / "s3"))
        except (FileNotFoundError, ValueError) as err:
            raise ModelLoadError(f"model source {source}: {err}") from None
    return source


def fetch_single_file(source: str, cache_dir: str | Path, download: ModelDownloadConfig | None = None) -> Path:
    """The local path of a single-file checkpoint: as given, or downloaded into ``cache_dir`` (an
    ``s3://`` object under ``s3/``, an http(s) URL under ``url/<hash of the URL>/``, within the limits of
    ``download``, default ``ModelDownloadConfig()``).

    A URL is fetched again only when the server says the file changed: the cached copy's ETag goes out
    as ``If-None-Match`` and a 304 keeps it. Downloads stream into a ``.partial`` file beside the target,
    renamed when whole; on any failure it is removed, so no half-written file looks complete.
    """
    if is_s3(source):
        try:
            return fetch_object(source, Path(cache_dir) / "s3")
        except (FileNotFoundError, ValueError) as err:
            raise ModelLoadError(f"model source {source}: {err}") from None
    if source.startswith(("http://", "https://")):
        directory = Path(cache_dir) / "url" / hashlib.sha256(source.encode()).hexdigest()[:16]
        return _download_url(source, directory, download or ModelDownloadConfig())
    path = Path(source).expanduser()
    if not path.is_file():
        raise ModelLoadError(f"model source {source} is not a file")
    return path


def download_limits(cfg: ModelDownloadConfig) -> Limits:
    """``model.download`` as the guarded downloader's limits."""
    return Limits(timeout_s=cfg.timeout_s, connect_timeout_s=cfg.connect_timeout_s, max_bytes=cfg.max_bytes,
                  max_redirects=cfg.max_redirects, allow_private_addresses=cfg.allow_private_addresses,
                  private_setting="model.download.allow_private_addresses", read_timeout_s=cfg.read_timeout_s,
                  chunk_bytes=1 << 20)


def _download_url(url: str, directory: Path, cfg: ModelDownloadConfig) -> Path:
    """``url`` into ``directory/<its file name>`` (kept when the server answers 304 to its ETag), or
    ``ModelLoadError`` in one line naming the URL (redacted) and why."""
    name = url.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
    target, etag_path = directory / name, directory / (name + ".etag")
    headers = {}
    if target.is_file() and etag_path.is_file():
        headers["If-None-Match"] = etag_path.read_text()
    fetcher = Fetcher(download_limits(cfg), headers={"User-Agent": USER_AGENT, "Accept": "*/*"})
    try:
        with fetcher.open(url, headers=headers) as reply:
            if reply.status == 304 and headers:
                return target
            if reply.status != 200:
                raise ModelLoadError(f"model source {redact(url)}: the server answered {reply.status}")
            directory.mkdir(parents=True, exist_ok=True)
            _write_whole(reply, target, etag_path)
            etag = reply.headers.get("ETag")
            if etag:
                etag_path.write_text(etag)
    except FetchError as err:
        raise ModelLoadError(f"model source {redact(url)}: cannot download: {redact(err.detail)}") from None
    finally:
        fetcher.close()
    return target


def _write_whole(reply, target: Path, etag_path: Path) -> None:
    """The body into a ``.partial`` file of its own (downloads into one cache may overlap), renamed to
    ``target`` once whole; removed on any failure. The old ETag goes first, so a crash can never pair it
    with the new file."""
    partial = target.with_name(f"{target.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.partial")
    try:
        with partial.open("xb") as fh:
            for chunk in reply.chunks():
                fh.write(chunk)
        etag_path.unlink(missing_ok=True)
        partial.replace(target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


# --- lineage -------------------------------------------------------------------------------------


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_sha256(directory: str | Path, variant: str | None = None) -> str:
    """A content hash of a pipeline directory's weights: sha256 over each weight file's relative path and
    sha256, in order. The same weights give the same hash wherever they are stored (a registry copy, an
    s3 prefix, a hub snapshot)."""
    files = weight_files(directory, variant)
    if not files:
        raise ModelLoadError(f"{directory} has no {variant or 'full-precision'} safetensors weights")
    lines = "".join(f"{p.relative_to(directory).as_posix()}\0{file_sha256(p)}\n" for p in files)
    return hashlib.sha256(lines.encode()).hexdigest()


def tensors_sha256(parts: SDXLParts | None = None, build=None) -> str:
    """A content hash of in-memory weights (the built models, which have no files): sha256 over every
    tensor's name, dtype, shape and bytes, module by module. ``build`` (a component name -> module function)
    instead of ``parts`` builds one component at a time and drops it once hashed, so the peak is the largest
    component, not the model."""
    digest = hashlib.sha256()
    for name in COMPONENTS:
        module = getattr(parts, name) if build is None else build(name)
        for key, value in sorted(module.state_dict().items()):
            value = value.detach().contiguous().cpu()
            digest.update(f"{name}.{key}|{value.dtype}|{tuple(value.shape)}".encode())
            digest.update(memoryview(value.view(torch.uint8).numpy()) if value.numel() else b"")
        del module
    return digest.hexdigest()


@dataclass
class SourceInfo:
    """What a run starts from: ``kind`` (``source_kind``), the source as given, where it was read
    (``location``), the resolved ``revision`` (a hub commit hash) and ``weights_sha256``.
    ``pinned`` is the model config that loads exactly these weights again (a hub source with its
    commit instead of a branch), which every worker of the run and the export use."""

    kind: str
    source: str
    location: str
    weights_sha256: str
    revision: str | None = None
    pinned: ModelConfig | None = None
    extra: dict = field(default_factory=dict)


def describe_source(model: ModelConfig, cache_dir: str | Path) -> SourceInfo:
    """Resolve and hash a non-registered source (``components.registry.model_sources`` handles ``models:/``).
    A hub id is downloaded (or found in the cache when offline) with diffusers' own ``download`` and pinned to
    the commit its snapshot is; its weights hash covers the files of ``model.variant``."""
    source, kind = model.source, source_kind(model.source)
    if kind == "tiny":
        return SourceInfo(kind, source, "tiny", tensors_sha256(build_tiny(model.tiny)), pinned=model)
    if kind == "sdxl_random":
        digest = tensors_sha256(build=lambda name: build_component(name, model.seed))
        release_memory()  # 10 GB of UNet built and dropped: the caller (the training driver) goes on
        return SourceInfo(kind, source, SDXL_RANDOM, digest, pinned=model, extra={"seed": model.seed})
    if kind == "single_file":
        path = fetch_single_file(source, cache_dir, model.download)
        return SourceInfo(kind, source, str(path), file_sha256(path), pinned=model)
    if kind in ("s3", "directory"):
        location = resolve_source(source, cache_dir)
        if not Path(location).is_dir():
            raise ModelLoadError(f"model source {source} is not a directory")
        return SourceInfo(kind, source, location, weights_sha256(location, model.variant), pinned=model)
    if kind != "hub" or "/" not in source:
        raise ModelLoadError(f"model source {source!r} is neither 'tiny', 'sdxl-random', a directory, a hub id, "
                             "a .safetensors file, s3:// nor models:/")
    offline = hub_offline()
    try:
        snapshot = Path(StableDiffusionXLPipeline.download(
            source, revision=model.revision, variant=model.variant, use_safetensors=True, local_files_only=offline))
    except (OSError, ValueError) as err:
        raise ModelLoadError(hub_error(source, err, offline)) from None
    commit = snapshot.name if snapshot.parent.name == "snapshots" else None
    pinned = model.model_copy(update={"revision": commit}) if commit else model
    return SourceInfo(kind, source, str(snapshot), weights_sha256(snapshot, model.variant), revision=commit,
                      pinned=pinned, extra={"requested_revision": model.revision or "main"})


def hub_error(source: str, err: BaseException, offline: bool) -> str:
    if offline:
        return (f"model source {source!r} is a hub id, not in the local Hugging Face cache, and HF_HUB_OFFLINE is "
                "set: run where the hub is reachable with HF_HUB_OFFLINE unset, or use a local directory, a "
                ".safetensors file or an s3:// prefix")
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return f"cannot load SDXL hub id (is the hub reachable?) {source!r}: {first}"
