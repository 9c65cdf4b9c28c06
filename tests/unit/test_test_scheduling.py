"""The suite's own scheduling on two xdist workers (tests/conftest.py): the serial group goes to one worker
first and alone, its Serve modules first; the other worker takes the unit-test modules, then the integration
groups; the serial worker takes more only at its last two tests."""

from __future__ import annotations

from types import SimpleNamespace

from tests.conftest import SERIAL, pytest_xdist_make_scheduler, serial_order, serial_scope, unit_rank

COLLECTION = [  # the real collection order: alphabetical, the integration modules before the unit tests
    "tests/integration/test_adapter_training.py::test_lora",
    "tests/integration/test_cluster.py::test_a",
    "tests/integration/test_cluster.py::test_b",
    "tests/integration/test_curate_flow.py::test_a",
    "tests/integration/test_demo.py::test_a",
    "tests/integration/test_demo.py::test_b",
    "tests/integration/test_evaluate.py::test_a",
    "tests/integration/test_faults_checkpoint.py::test_a",
    "tests/integration/test_flows_cli.py::test_a",
    "tests/integration/test_model_card.py::test_a",
    "tests/integration/test_models_in_out.py::test_a",
    "tests/integration/test_serve_api.py::test_a",
    "tests/integration/test_serve_api.py::test_b",
    "tests/integration/test_serve_faults.py::test_a",
    "tests/integration/test_train.py::test_a",
    "tests/unit/registry/test_promotion.py::test_a",
    "tests/unit/test_config.py::test_a",
    "tests/unit/test_config.py::test_b",
    "tests/unit/test_storage.py::test_a",
]
SERIAL_IN_ORDER = [
    "tests/integration/test_serve_api.py::test_a",
    "tests/integration/test_serve_api.py::test_b",
    "tests/integration/test_serve_faults.py::test_a",
    "tests/integration/test_evaluate.py::test_a",
    "tests/integration/test_faults_checkpoint.py::test_a",
    "tests/integration/test_train.py::test_a",
    "tests/unit/registry/test_promotion.py::test_a",
]


class Worker:
    """What the scheduler needs of an xdist worker controller."""

    def __init__(self, name: str):
        self.gateway, self.shutting_down, self.sent = SimpleNamespace(id=name), False, []

    def send_runtest_some(self, indices):
        self.sent.extend(COLLECTION[i] for i in indices)

    def shutdown(self):
        self.shutting_down = True


def scheduled():
    config = SimpleNamespace(getvalue=lambda name: ["2*popen"], option=SimpleNamespace(loadscopereorder=True))
    sched = pytest_xdist_make_scheduler(config, None)
    first, second = Worker("gw0"), Worker("gw1")
    for worker in (first, second):
        sched.add_node(worker)
    for worker in (first, second):
        sched.add_node_collection(worker, COLLECTION)
    sched.schedule()
    return sched, first, second


def complete(sched, worker, nodeid):
    sched.mark_test_complete(worker, COLLECTION.index(nodeid))


def test_the_serial_group_goes_first_and_alone_to_one_worker_its_serve_modules_first():
    sched, first, second = scheduled()
    assert first.sent == SERIAL_IN_ORDER
    assert second.sent[:2] == ["tests/unit/test_config.py::test_a", "tests/unit/test_config.py::test_b"]
    assert not any(serial_scope(t) == SERIAL for t in second.sent)


def test_the_other_worker_takes_the_unit_modules_then_the_groups_with_the_demo_last():
    sched, first, second = scheduled()
    while sched.workqueue:
        done = next(t for t in second.sent if not sched.assigned_work[second][serial_scope(t)][t])
        complete(sched, second, done)
    scopes = list(dict.fromkeys(serial_scope(t) for t in second.sent))
    assert scopes == ["tests/unit/test_config.py", "tests/unit/test_storage.py", "curate", "cluster", "adapter",
                      "flows_cli", "trained_champion", "demo"]
    assert first.sent == SERIAL_IN_ORDER  # busy with its own: nothing else was handed to it


def test_the_serial_worker_takes_more_only_at_its_last_two_tests():
    sched, first, second = scheduled()
    for done in SERIAL_IN_ORDER[:-3]:
        complete(sched, first, done)
        assert first.sent == SERIAL_IN_ORDER  # three or more left: nothing else yet
    complete(sched, first, SERIAL_IN_ORDER[-3])
    # the next unit in the queue (the other worker holds both unit modules: it had two tests or fewer to run)
    assert first.sent[len(SERIAL_IN_ORDER):] == ["tests/integration/test_curate_flow.py::test_a"]


def test_ranks_and_serial_order():
    assert unit_rank(SERIAL) == 0 < unit_rank("tests/unit/test_config.py") == unit_rank("tests/unit/test_storage.py")
    assert (unit_rank("tests/unit/test_storage.py") < unit_rank("curate") < unit_rank("trained_champion")
            < unit_rank("demo"))
    assert serial_order([t for t in COLLECTION if serial_scope(t) == SERIAL]) == SERIAL_IN_ORDER
