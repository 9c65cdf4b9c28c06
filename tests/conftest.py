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
"""``make test`` runs two pytest-xdist workers. The serial group runs in order on one of them: the integration
tests whose faults, load, autoscaling and timeouts must not meet one another, and the unit modules whose
checks involve a sub-second clock. Everything else runs on the other worker beside it, a module (or a group
of modules sharing a session fixture) at a time."""

TIMED_UNIT_MODULES = ("tests/unit/registry/test_promotion.py",)
"""Unit modules with sub-second heartbeats or timeouts (the promotion lock's), run with the serial group."""

BESIDE_THE_SERIAL_GROUP = {
    "tests/integration/test_demo.py": "demo",
    "tests/integration/test_adapter_training.py": "adapter",
    "tests/integration/test_cluster.py": "cluster",
    "tests/integration/test_models_in_out.py": "trained_champion",  # the two share that session fixture
    "tests/integration/test_model_card.py": "trained_champion",
    "tests/integration/test_curate_corpus.py": "curate",
    "tests/integration/test_curate_flow.py": "curate",
    "tests/integration/test_curate_latents.py": "curate",
    "tests/integration/test_curate_s3.py": "curate",
    "tests/integration/test_curate_sources.py": "curate",
    "tests/integration/test_curate_bench.py": "curate",
}
"""Integration modules that inject no fault, time nothing and load no server, by their unit of work. An
integration module not named here runs in the serial group."""


def serial_scope(nodeid: str) -> str:
    """The unit of work of a test: ``SERIAL``, a group of ``BESIDE_THE_SERIAL_GROUP``, or its module."""
    path = nodeid.split("::", 1)[0]
    if path in BESIDE_THE_SERIAL_GROUP:
        return BESIDE_THE_SERIAL_GROUP[path]
    return SERIAL if path.startswith("tests/integration/") or path in TIMED_UNIT_MODULES else path


def pytest_xdist_make_scheduler(config, log):
    """pytest-xdist's scope scheduling with ``serial_scope`` as the scope (``--dist loadgroup`` would need
    markers that pytest 9 no longer lets pytest-xdist 3.8 turn into groups)."""
    from xdist.scheduler import LoadScopeScheduling

    config.option.loadscopereorder = False  # units in collection order: the long integration units first,
    # the many short unit-test modules last (sorted by test count, the demo's two tests would start last)

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
