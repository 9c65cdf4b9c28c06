"""Test-session set-up: offline Hugging Face, the shared fixture modules, and a tiny config under a
temporary state directory. Servers and registries live in ``tests/fixtures/``."""

from __future__ import annotations

import os

import pytest

from tests.fixtures.processes import REPO

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

pytest_plugins = ["tests.fixtures.servers", "tests.fixtures.registry", "tests.fixtures.http_images"]

SERIAL = "serial"
"""``make test`` runs two pytest-xdist workers. The integration tests, and the unit modules whose checks
involve a clock, form one unit of work that runs in order on one worker; the other unit tests run on the
second worker beside them. The integration tests' fault injection, load and autoscaling never share the two
cores with each other, and a heartbeat of a fraction of a second never waits behind them."""

TIMED_UNIT_MODULES = ("tests/unit/registry/test_promotion.py",)
"""Unit modules with sub-second heartbeats or timeouts (the promotion lock's), run with the serial group."""


def serial_scope(nodeid: str) -> str:
    """The unit of work of a test: ``SERIAL`` for the integration tests and ``TIMED_UNIT_MODULES``, the test
    itself for the rest."""
    path = nodeid.split("::", 1)[0]
    return SERIAL if path.startswith("tests/integration/") or path in TIMED_UNIT_MODULES else nodeid


def pytest_xdist_make_scheduler(config, log):
    """pytest-xdist's scope scheduling with ``serial_scope`` as the scope (``--dist loadgroup`` would need
    markers that pytest 9 no longer lets pytest-xdist 3.8 turn into groups)."""
    from xdist.scheduler import LoadScopeScheduling

    class SerialGroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return serial_scope(nodeid)

    return SerialGroupScheduling(config, log)


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
