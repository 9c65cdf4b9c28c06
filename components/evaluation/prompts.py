"""The prompt set of the quality metrics: a JSON-lines file shipped in the repository
(``data/eval/prompts.jsonl``: people, objects, scenes, text, very dark and very bright scenes), versioned
by the hash of its bytes, which enters the evaluation protocol."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from components.config import ConfigError


@dataclass(frozen=True)
class PromptSet:
    prompts: list[str]
    categories: list[str]
    version: str
    """``sha256:<12 hex>`` of the file's bytes."""


def load_prompt_set(path: str | Path, limit: int | None = None) -> PromptSet:
    """The prompts of ``path``; with ``limit``, the first ``limit`` taken round-robin across the
    categories (so a short evaluation still covers every kind of prompt)."""
    path = Path(path)
    try:
        blob = path.read_bytes()
    except OSError as err:
        raise ConfigError(f"evaluate.prompts {path}: {err.strerror}") from None
    rows = []
    for lineno, line in enumerate(blob.decode("utf-8").splitlines(), 1):
        if line.strip():
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                raise ConfigError(f"evaluate.prompts {path}:{lineno}: expected {{\"prompt\": ..., \"category\": ...}}")
            rows.append((row["prompt"], str(row.get("category", ""))))
    if limit is not None and limit < len(rows):
        by_category: dict[str, list[tuple[str, str]]] = {}
        for row in rows:
            by_category.setdefault(row[1], []).append(row)
        picked, depth = [], 0
        while len(picked) < limit:
            for items in by_category.values():
                if depth < len(items) and len(picked) < limit:
                    picked.append(items[depth])
            depth += 1
        rows = picked
    version = "sha256:" + hashlib.sha256(blob).hexdigest()[:12]
    return PromptSet([p for p, _ in rows], [c for _, c in rows], version)
