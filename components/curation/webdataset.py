"""Webdataset sources: tar shards whose members are grouped into samples by key, read by Ray Data.

A shard is a tar whose members share a key per sample (``a/0001.jpg``, ``a/0001.txt``, ``a/0001.json``:
the key is the member name up to the first dot of its base name), the layout img2dataset writes and
diffusers' SDXL distillation scripts and SimpleTuner read. The location names the shards (docs/sources.md):
a ``.tar`` file, a folder or ``s3://`` prefix of them, a glob (``/data/*.tar``), or http(s) URLs, each part
possibly a brace pattern (``shards-{000..009}.tar``, ``{train,extra}/0000.tar``). The driver expands and
lists them (``shard_list``: a missing local or S3 shard is one ``SourceError`` line before any work; an
http(s) URL is checked when Ray Data opens the dataset); Ray Data's ``read_webdataset`` reads the tars in its
own tasks, without decoding, and ``webdataset_records`` turns each sample into one ``inline`` record:

- the image is the sample's first ``jpg``, ``jpeg``, ``png`` or ``webp`` member (its bytes travel in the
  record, like a Hugging Face dataset's); a sample without one is refused as ``empty``;
- the caption is the ``.json`` member's ``caption_column`` field, else the ``.txt`` member (both count as
  caption origin ``column``: the caption the source itself carries);
- the metadata scores (``filters.watermark_column``, ``punsafe``, ``similarity``) are the ``.json``
  member's fields of those names, img2dataset's layout for LAION; a ``.json`` that is not a JSON object, or
  a ``.txt`` that is not UTF-8, refuses the sample as ``unreadable``;
- ``source`` is ``<shard>#<key>``; the curated row's ``sha256`` is that of the image member's bytes.

How many samples a shard holds is known only once it is read, so the pipeline counts a webdataset source's
inputs from its outcomes (``sources.SourceInputs.shards``).
"""

from __future__ import annotations

import glob
import json
import os
import posixpath
import re
import tarfile
from fnmatch import fnmatch

import pyarrow as pa

from components.config import SourceConfig
from components.curation.filters import Reason
from components.curation.records import RECORD_SCHEMA, SourceError, float_or_none, setting
from components.storage import Store, arrow_filesystem, filesystem_path, is_s3, split_s3

IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp")
"""The members a sample's image is taken from, in this order of preference."""
MEMBERS = (*IMAGE_MEMBERS, "txt", "json")
"""The only members read into a sample (Ray's ``suffixes``): others (``.cls``, ``.npy``...) are skipped."""
SHARD_SUFFIX = ".tar"
"""What a file must end with to be a shard when a folder or prefix is listed (named shards may be any tar)."""
BRACE = re.compile(r"\{([^{}]*)\}")
GLOB = re.compile(r"[*?\[]")


def is_url(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def expand_braces(pattern: str) -> list[str]:
    """Every name a brace pattern stands for, in order: ``{000..009}`` (a numeric range, zero-padded to the
    longer bound's width when a bound starts with 0, as webdataset's ``braceexpand`` does) and ``{a,b}``;
    several groups multiply. ``ValueError`` for a group that is neither, or a range that runs backwards."""
    match = BRACE.search(pattern)
    if match is None:
        return [pattern]
    body = match.group(1)
    numeric = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numeric:
        lo, hi = numeric.groups()
        if int(lo) > int(hi):
            raise ValueError(f"brace range {{{body}}} runs backwards")
        width = max(len(lo), len(hi)) if lo.startswith("0") or hi.startswith("0") else 0
        values = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    elif "," in body:
        values = body.split(",")
    else:
        raise ValueError(f"brace group {{{body}}} is neither a range {{000..009}} nor a list {{a,b}}")
    head, tail = pattern[:match.start()], pattern[match.end():]
    return [name for value in values for name in expand_braces(head + value + tail)]


def _local_shards(pattern: str) -> list[str]:
    if GLOB.search(pattern):
        return sorted(os.path.abspath(p) for p in glob.glob(pattern) if os.path.isfile(p))
    if os.path.isfile(pattern):
        return [os.path.abspath(pattern)]
    if os.path.isdir(pattern):
        return [os.path.abspath(p) for p in Store().list(pattern) if p.endswith(SHARD_SUFFIX)]
    return []


def _s3_shards(pattern: str, store: Store, listed: dict[str, list[str]]) -> list[str]:
    """The S3 shards ``pattern`` names: a glob or a ``.tar`` key is matched against one listing of its
    folder (``listed`` caches them: ten thousand brace-expanded names cost one listing, not ten thousand
    requests); any other key is a prefix whose ``.tar`` objects are the shards."""
    bucket, key = split_s3(pattern)
    globbed = GLOB.search(key)
    if not globbed and not key.endswith(SHARD_SUFFIX):
        return [u for u in store.list(pattern) if u.endswith(SHARD_SUFFIX)]
    folder = posixpath.dirname(key[:globbed.start()] if globbed else key)
    where = f"s3://{bucket}/{folder}" if folder else f"s3://{bucket}"
    if where not in listed:
        listed[where] = list(store.list(where))
    if globbed:
        return sorted(u for u in listed[where] if fnmatch(u, pattern))
    return [pattern] if pattern in listed[where] else []


def shard_list(src: SourceConfig, store: Store) -> list[str]:
    """The shards of a webdataset source, in the order its location names them (globs and listings
    sorted), each once; ``SourceError`` (one line naming the setting) for a bad brace pattern, a name that
    matches no shard, no shards at all, or shards of more than one kind of place (local, s3://, http(s))."""
    where = f"{setting(src, 'location')} {src.location}"
    try:
        patterns = expand_braces(src.location)
    except ValueError as err:
        raise SourceError(f"{where}: {err}") from None
    shards: list[str] = []
    listed: dict[str, list[str]] = {}
    for pattern in patterns:
        if is_url(pattern):
            if GLOB.search(pattern.split("?", 1)[0].split("://", 1)[1]):
                raise SourceError(f"{where}: a URL cannot be globbed ({pattern}); name its shards with a brace "
                                  "pattern such as shards-{000..009}.tar")
            found = [pattern]
        elif is_s3(pattern):
            found = _s3_shards(pattern, store, listed)
        else:
            found = _local_shards(os.path.expanduser(pattern))
        if not found:
            what = "no such shard" if pattern.endswith(SHARD_SUFFIX) and not GLOB.search(pattern) else \
                f"no {SHARD_SUFFIX} shards there"
            raise SourceError(f"{where}: {pattern}: {what}")
        shards += found
    kinds = {"http(s)" if is_url(s) else "s3" if is_s3(s) else "local" for s in shards}
    if len(kinds) > 1:
        raise SourceError(f"{where}: its shards are {' and '.join(sorted(kinds))}; one source reads one kind "
                          "of place (make one source per kind)")
    return list(dict.fromkeys(shards))


def shard_root(location: str) -> str | None:
    """The folder or prefix a webdataset location reads under (for the output-overlap check), from the
    location alone: the part before any brace or glob, a named shard's folder; None for http(s) URLs."""
    if is_url(location):
        return None
    cut = min((m.start() for m in (BRACE.search(location), GLOB.search(location)) if m), default=None)
    if cut is not None:
        head = location[:cut]
        return head.rstrip("/") if head.endswith("/") else posixpath.dirname(head)
    return posixpath.dirname(location) if location.endswith(SHARD_SUFFIX) else location


def _text(value) -> str | None:
    return value.strip() if isinstance(value, str) and value.strip() else None


def webdataset_records(batch, source: dict) -> pa.Table:
    """Ray Data map function: samples of ``read_webdataset`` (a pandas batch with ``__key__``, ``__url__``
    and one column of raw bytes per member kind, None where a sample has no such member) -> one
    ``RECORD_SCHEMA`` record per sample (see the module docstring)."""
    src = SourceConfig.model_validate(source)
    rows = batch.to_dict("records")
    n = len(rows)
    out: dict[str, list] = {k: [None] * n for k in RECORD_SCHEMA.names}
    out["source_name"], out["fetch"] = [src.name] * n, ["inline"] * n
    mark_col = src.filters.watermark_column
    for i, row in enumerate(rows):
        shard = row["__url__"]
        if is_s3(src.location) and not is_s3(shard):  # Ray hands bucket/key
            shard = "s3://" + shard
        key = row["__key__"]
        out["source"][i] = f"{shard}#{key}"
        ext = next((e for e in IMAGE_MEMBERS if isinstance(row.get(e), bytes) and row[e]), None)
        why, meta = None, {}
        raw = row.get("json")
        if isinstance(raw, bytes):
            try:
                meta = json.loads(raw)
            except (ValueError, UnicodeDecodeError):
                meta = None
            if not isinstance(meta, dict):
                why, meta = "its .json member is not a JSON object", {}
        caption = _text(meta.get(src.caption_column))
        txt = row.get("txt")
        if caption is None and isinstance(txt, bytes):
            try:
                caption = _text(txt.decode("utf-8"))
            except UnicodeDecodeError:
                why = why or "its .txt member is not UTF-8"
        out["caption"][i] = caption
        for score, field in (("pwatermark", mark_col), ("punsafe", "punsafe"), ("similarity", "similarity")):
            out[score][i] = float_or_none(meta.get(field))
        if ext is None:
            out["reject"][i] = str(Reason.EMPTY)
            out["detail"][i] = f"no {', '.join('.' + e for e in IMAGE_MEMBERS)} member"
        elif why:
            out["reject"][i], out["detail"][i] = str(Reason.UNREADABLE), why
        else:
            out["data"][i], out["name"][i] = row[ext], f"{posixpath.basename(key)}.{ext}"
    return pa.table(out, schema=RECORD_SCHEMA)


def _filesystem(shards: list[str], endpoint_url: str | None):
    """(pyarrow filesystem, the paths it takes) for Ray Data to read ``shards`` with."""
    if is_url(shards[0]):
        import pyarrow.fs  # on first use, with fsspec's HTTP filesystem (aiohttp): only http(s) shards need them
        from fsspec.implementations.http import HTTPFileSystem

        # trust_env: through the environment's proxy, as components/http_fetch.py downloads
        return pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(HTTPFileSystem(client_kwargs={"trust_env": True}))), \
            shards
    fs = arrow_filesystem(shards[0], endpoint_url)
    return fs, [filesystem_path(s) for s in shards] if fs is not None else shards


def read_shards(src: SourceConfig, shards: list[str], endpoint_url: str | None, remote_args: dict):
    """The records of a webdataset source as a Ray Dataset: Ray Data's ``read_webdataset`` (raw bytes of
    the ``MEMBERS`` only, no decoding) mapped by ``webdataset_records`` in the read tasks. A shard Ray Data
    cannot open (an http(s) URL that does not answer) is a ``SourceError``."""
    import ray  # on first use: the driver's listing (shard_list) needs no Ray

    fs, paths = _filesystem(shards, endpoint_url)
    try:
        ds = ray.data.read_webdataset(paths, filesystem=fs, decoder=None, suffixes=list(MEMBERS), **remote_args)
    except (OSError, ValueError) as err:
        raise SourceError(f"{setting(src, 'location')} {src.location}: cannot open its "
                          f"shards ({type(err).__name__}: {str(err).splitlines()[0][:300]})") from None
    return ds.map_batches(webdataset_records, batch_size=None, batch_format="pandas",
                          fn_kwargs={"source": src.model_dump(mode="json")})


def unreadable_shard(err: tarfile.ReadError, sources: list[SourceConfig], output: str) -> SourceError:
    """The one line for a shard Ray Data's read found not to be a tar, or to end early: Ray raises the
    ``tarfile.ReadError`` (as a ``RayTaskError`` that is one) with its retry advice and no shard name, so
    the line names the webdataset sources' locations and the first line of tarfile's reason."""
    reason = (str(err.args[0]) if err.args else str(err)).strip().splitlines()
    names = ", ".join(setting(s, "location") for s in sources) or "a webdataset source"
    return SourceError(f"a shard of {names} is not a tar or ends early ({reason[0] if reason else 'no reason'}); "
                       f"curation stopped, {output} has no _SUCCESS: check the shards (tar -tf) and rerun")
