"""Test-session set-up: offline Hugging Face, the shared fixture modules, and a tiny config under a
temporary state directory. Servers and registries live in ``tests/fixtures/``."""

from __future__ import annotations

import os

import pytest

from tests.fixtures.processes import REPO

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

pytest_plugins = ["tests.fixtures.servers", "tests.fixtures.registry", "tests.fixtures.http_images"]


@pytest.fixture
def tiny_cfg(tmp_path):
    """The tiny preset with every output under a fresh temporary state directory."""
    from components.config import load_config

    state = tmp_path / "state"
    return load_config(
        REPO / "flows/configs/tiny.yaml",
        [
            f"state_dir={state}",
            f"curate.output={state}/datasets/demo",
            f"train.data={state}/datasets/demo",
            f"train.storage_path={state}/ray_results",
        ],
    )
