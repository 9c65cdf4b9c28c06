"""The suite's own scheduling on two xdist workers (tests/conftest.py): the serial group goes to one worker
first and alone, the long integration groups to the other, and the unit-test modules fill in behind."""

from __future__ import annotations

from types import SimpleNamespace

from tests.conftest import SERIAL, pytest_xdist_make_scheduler, serial_scope, unit_rank

COLLECTION = [  # the real collection order: alphabetical, the integration modules before the unit tests
    "tests/integration/test_adapter_training.py::test_lora",
    "tests/integration/test_cluster.py::test_a",
    "tests/integration/test_cluster.py::test_b",
    "tests/integration/test_curate_flow.py::test_a",
    "tests/integration/test_demo.py::test_a",
    "tests/integration/test_demo.py::test_b",
    "tests/integration/test_evaluate.py::test_a",
    "tests/integration/test_faults_checkpoint.py::test_a",
    "tests/integration/test_model_card.py::test_a",
    "tests/integration/test_models_in_out.py::test_a",
    "tests/integration/test_serve_api.py::test_a",
    "tests/integration/test_serve_api.py::test_b",
    "tests/integration/test_train.py::test_a",
    "tests/unit/registry/test_promotion.py::test_a",
    "tests/unit/test_config.py::test_a",
    "tests/unit/test_config.py::test_b",
    "tests/unit/test_storage.py::test_a",
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


def serial_tests():
    return [t for t in COLLECTION if serial_scope(t) == SERIAL]


def test_the_serial_group_goes_first_and_alone_to_one_worker():
    sched, first, second = scheduled()
    assert first.sent == serial_tests()  # in collection order, the promotion lock's unit module included
    assert second.sent[:2] == ["tests/integration/test_demo.py::test_a", "tests/integration/test_demo.py::test_b"]
    assert not any(serial_scope(t) == SERIAL for t in second.sent)


def test_the_serial_worker_takes_more_only_at_its_last_two_tests_and_then_the_unit_modules():
    sched, first, second = scheduled()
    # the other worker goes through the integration groups, longest first
    while sched.workqueue and not any(t.startswith("tests/unit/") for t in second.sent):
        done = next(t for t in second.sent if not sched.assigned_work[second][serial_scope(t)][t])
        sched.mark_test_complete(second, COLLECTION.index(done))
    assert [serial_scope(t) for t in dict.fromkeys(second.sent)][:6] == [
        "demo", "demo", "trained_champion", "trained_champion", "curate", "cluster"]
    serial = serial_tests()
    for done in serial[:-3]:
        sched.mark_test_complete(first, COLLECTION.index(done))
        assert first.sent == serial  # three or more left: nothing else yet
    sched.mark_test_complete(first, COLLECTION.index(serial[-3]))
    assert first.sent[len(serial):] and all(t.startswith("tests/unit/") for t in first.sent[len(serial):])


def test_unit_rank_orders_serial_then_groups_then_modules():
    assert unit_rank(SERIAL) == 0 < unit_rank("demo") < unit_rank("trained_champion") < unit_rank("adapter")
    assert unit_rank("adapter") < unit_rank("tests/unit/test_config.py") == unit_rank("tests/unit/test_storage.py")
