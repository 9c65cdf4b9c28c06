"""What kind of model source a ``model.source`` string names, without loading torch or diffusers.

The flows' preflight classifies a source before anything heavy is imported, so a mistyped source is refused
in a fraction of a second; ``components.diffusion.sources`` reads each kind.
"""

from __future__ import annotations

import os
from pathlib import Path

from huggingface_hub import constants

from components.storage import is_s3

SDXL_RANDOM = "sdxl-random"
SINGLE_FILE_SUFFIX = ".safetensors"
REGISTERED_PREFIX = "models:/"


def source_kind(source: str) -> str:
    """``tiny``, ``sdxl_random``, ``registered`` (models:/), ``single_file`` (a .safetensors path, s3:// object or URL),
    ``s3`` (a prefix), ``url`` (an http(s) address that is not a .safetensors file: refused),
    ``directory`` (local) or ``hub`` (anything else: a hub id, checked when loaded)."""
    if source == "tiny":
        return "tiny"
    if source == SDXL_RANDOM:
        return "sdxl_random"
    if source.startswith(REGISTERED_PREFIX):
        return "registered"
    if source.lower().split("?", 1)[0].endswith(SINGLE_FILE_SUFFIX):
        return "single_file"
    if is_s3(source):
        return "s3"
    if source.startswith(("http://", "https://")):
        return "url"
    if Path(source).expanduser().is_dir() or source.startswith((".", "/", "~")):
        return "directory"
    return "hub"


def hub_offline() -> bool:
    """HF_HUB_OFFLINE as set now (huggingface_hub reads it once, at import) or at import time.

    Offline, a hub id is looked up in the local cache only (``local_files_only``), so loading fails
    at once with one line instead of a connection attempt and a logged warning.
    """
    now = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}
    return now or bool(constants.HF_HUB_OFFLINE)
