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

BESIDE_THE_SERIAL_GROUP = {  # in the order the other worker takes them, after the unit-test modules
    "tests/integration/test_curate_corpus.py": "curate",
    "tests/integration/test_curate_flow.py": "curate",
    "tests/integration/test_curate_latents.py": "curate",
    "tests/integration/test_curate_s3.py": "curate",
    "tests/integration/test_curate_sources.py": "curate",
    "tests/integration/test_curate_bench.py": "curate",
    "tests/integration/test_cluster.py": "cluster",
    "tests/integration/test_adapter_training.py": "adapter",
    "tests/integration/test_flows_cli.py": "flows_cli",  # refusals before Ray starts: subprocesses, no cluster
    "tests/integration/test_models_in_out.py": "trained_champion",  # the two share that session fixture
    "tests/integration/test_model_card.py": "trained_champion",
    "tests/integration/test_registry_server.py": "registry_server",  # its own `mlflow server`, used by no other module
    "tests/integration/test_gate.py": "gate",  # evaluations and promotions in its own SQLite store
    "tests/integration/test_demo.py": "demo",  # the heaviest load (a cluster, training, Serve): last
}
"""Integration modules that inject no fault, time nothing and load no server, by their unit of work. An
integration module not named here runs in the serial group."""

SERIAL_FIRST = "tests/integration/test_serve_"
"""The serial group runs these modules first: their load and backpressure tests are the most sensitive to what
runs beside them, and at the start the other worker runs the unit-test modules, the lightest load of all."""


def serial_scope(nodeid: str) -> str:
    """The unit of work of a test: ``SERIAL``, a group of ``BESIDE_THE_SERIAL_GROUP``, or its module."""
    path = nodeid.split("::", 1)[0]
    if path in BESIDE_THE_SERIAL_GROUP:
        return BESIDE_THE_SERIAL_GROUP[path]
    return SERIAL if path.startswith("tests/integration/") or path in TIMED_UNIT_MODULES else path


def unit_rank(scope: str) -> int:
    """Where a unit of work stands in the queue: the serial group first, then the unit-test modules in collection
    order, then the integration groups beside the serial group, in ``BESIDE_THE_SERIAL_GROUP``'s order."""
    if scope == SERIAL:
        return 0
    groups = list(dict.fromkeys(BESIDE_THE_SERIAL_GROUP.values()))
    return 2 + groups.index(scope) if scope in groups else 1


def serial_order(nodeids: list[str]) -> list[str]:
    """The serial group's tests in the order they run: the ``SERIAL_FIRST`` modules, then the rest, each part in
    collection order (so a module's tests stay together)."""
    return sorted(nodeids, key=lambda nodeid: not nodeid.startswith(SERIAL_FIRST))


def pytest_xdist_make_scheduler(config, log):
    """pytest-xdist's scope scheduling with ``serial_scope`` as the scope (``--dist loadgroup`` would need
    markers that pytest 9 no longer lets pytest-xdist 3.8 turn into groups), its queue in ``unit_rank`` order.

    xdist hands a worker its next unit whenever it has two tests or fewer left. In collection order the first
    units (adapter, cluster, curation, demo) went to both workers before the serial group did, and the demo and
    the cluster tests ran after the serial group on its worker while the other sat idle for ten minutes. With
    the serial group first, its worker takes nothing else until its last two tests, and then whatever is left:
    the units left at the end are the ones the other worker has not reached yet."""
    # pytest-xdist calls this hook; a session without it never imports xdist
    from xdist.scheduler import LoadScopeScheduling

    config.option.loadscopereorder = False  # ``unit_rank`` orders the queue, not the test count

    class SerialGroupScheduling(LoadScopeScheduling):
        _ranked = False

        def _split_scope(self, nodeid: str) -> str:
            return serial_scope(nodeid)

        def _assign_work_unit(self, node) -> None:
            if not self._ranked:  # the queue is complete by the first assignment (``schedule``)
                units = sorted(self.workqueue.items(), key=lambda unit: unit_rank(unit[0]))  # stable
                self.workqueue.clear()
                self.workqueue.update(units)
                if SERIAL in self.workqueue:  # a worker runs a unit's tests in the order they are sent
                    tests = self.workqueue[SERIAL]
                    self.workqueue[SERIAL] = {nodeid: tests[nodeid] for nodeid in serial_order(list(tests))}
                self._ranked = True
            super()._assign_work_unit(node)

    return SerialGroupScheduling(config, log)


@pytest.fixture
def tiny_cfg(tmp_path):
    """The tiny preset with every output under a fresh temporary state directory."""
    from components.config import load_config  # on first use: a session that never asks for it loads no config schema

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
