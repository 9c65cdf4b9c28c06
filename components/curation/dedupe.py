"""Exact-duplicate detection across every worker: one small actor that owns the set of content hashes.

A streaming pipeline has no global view, so the first worker to claim a SHA-256 owns it and later
claims of the same bytes are duplicates. A claim by the *same* source again succeeds (idempotent),
so a curation task that Ray retries after a worker failure does not drop its own images as
duplicates. Memory: 32-byte hash -> 8-byte source hash, ~100 B per image in CPython, ~80 MB for
the 770k images of the Terminus dataset. The claim runs after every other filter, so a kept image
is never shadowed by a byte-identical copy that a metadata filter (caption, watermark) refused.
"""

from __future__ import annotations

import hashlib


class DedupeIndex:
    """Plain class (also used single-process); ``ray.remote(DedupeIndex)`` makes the shared actor."""

    def __init__(self):
        self._owner: dict[bytes, bytes] = {}

    def claim(self, sha256: str, source: str) -> bool:
        owner = hashlib.blake2b(source.encode(), digest_size=8).digest()
        return self._owner.setdefault(bytes.fromhex(sha256), owner) == owner

    def size(self) -> int:
        return len(self._owner)
