"""Which failures ``fit`` starts another attempt for: a lost node or worker, whether it surfaced inside Ray
Train's run or while the attempt read its data; never a user's error before training."""

from __future__ import annotations

import pytest
import ray

from components.config import load_config
from components.training import driver
from tests.fixtures.processes import REPO


class Attempts:
    def __init__(self, *outcomes):
        self.outcomes, self.calls = list(outcomes), 0

    def __call__(self, *args, **kwargs):  # driver.trainer(...): one attempt's trainer
        self.calls += 1
        return self

    def fit(self):
        outcome = self.outcomes[self.calls - 1]
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome


def _wrapped(inner: BaseException) -> Exception:
    try:
        try:
            raise inner
        except BaseException as err:
            raise RuntimeError("reading the split failed") from err
    except RuntimeError as outer:
        return outer


@pytest.fixture
def cfg(tmp_path):
    return load_config(REPO / "flows/configs/tiny.yaml", [f"state_dir={tmp_path}", "train.max_failures=1"])


@pytest.mark.parametrize("lost", [ray.exceptions.ActorDiedError(), ray.exceptions.NodeDiedError("node gone"),
                                  ray.exceptions.UnserializableException("The actor died because its node has died")])
def test_a_lost_node_while_an_attempt_reads_its_data_starts_another(cfg, monkeypatch, lost):
    attempts = Attempts(_wrapped(lost), "result")
    monkeypatch.setattr(driver, "trainer", attempts)
    assert driver.fit(cfg, None, "run") == "result" and attempts.calls == 2


def test_other_errors_before_training_are_raised_at_once(cfg, monkeypatch):
    attempts = Attempts(_wrapped(ValueError("a bad shard")), "result")
    monkeypatch.setattr(driver, "trainer", attempts)
    with pytest.raises(RuntimeError, match="reading the split failed"):
        driver.fit(cfg, None, "run")
    assert attempts.calls == 1


def test_the_last_allowed_attempt_ends_with_one_line(cfg, monkeypatch):
    monkeypatch.setattr(driver, "trainer", Attempts(_wrapped(ray.exceptions.ActorDiedError()),
                                                    _wrapped(ray.exceptions.ActorDiedError())))
    with pytest.raises(driver.TrainingFailed, match=r"training failed after 2 attempt\(s\)"):
        driver.fit(cfg, None, "run")
