"""What every curation source becomes: ``RECORD_SCHEMA`` rows, and the one-line ``SourceError`` a source
that cannot be used raises (shared by ``sources`` and ``webdataset``; ``sources`` documents the columns)."""

from __future__ import annotations

import pyarrow as pa

from components.config import DEFAULT_SOURCE, SourceConfig
from components.redact import redact

RECORD_SCHEMA = pa.schema(
    [
        ("source", pa.string()),
        ("source_name", pa.string()),
        ("fetch", pa.string()),  # "path" (Store.read), "url" (HTTP download) or "inline" (``data``)
        ("data", pa.binary()),
        ("name", pa.string()),
        ("caption", pa.string()),
        ("sidecar", pa.string()),
        ("pwatermark", pa.float64()),
        ("punsafe", pa.float64()),
        ("similarity", pa.float64()),
        ("reject", pa.string()),
        ("detail", pa.string()),
    ]
)


class SourceError(ValueError):
    """A source that cannot be used at all (missing, unreadable manifest, no path column, an output that
    overlaps it). The message is redacted when the error is made: it often quotes a library's error
    text, which may carry an endpoint URL with its credentials."""

    def __init__(self, message: str):
        super().__init__(redact(message))


def setting(src: SourceConfig, key: str) -> str:
    """How the user names ``key`` of ``src`` in the config (and in ``--set``): the shorthand's
    ``curate.source`` or ``curate.sources.<name>.location``."""
    if src.name == DEFAULT_SOURCE:
        return {"location": "curate.source"}.get(key, f"curate.{key}")
    return f"curate.sources.{src.name}.{key}"


def float_or_none(value) -> float | None:
    """A metadata score as a float; None when missing, empty or not a number."""
    if value is None or value == "":
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None
