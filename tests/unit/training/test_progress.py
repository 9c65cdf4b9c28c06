"""The console progress line of training."""

from __future__ import annotations

from components.training.progress import Progress, duration


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_duration():
    assert [duration(s) for s in (5, 75, 3725)] == ["5s", "1m15s", "1h02m"]
    assert duration(float("inf")) == "?"


def test_a_line_every_n_steps_or_every_interval():
    clock, lines = Clock(), []
    p = Progress(total=100, start_step=0, every_steps=10, every_s=30.0, clock=clock, write=lines.append)
    metrics = {"loss": 0.25, "lr": 3e-4, "images_per_s": 12.5}
    for step in range(1, 10):
        clock.now += 1.0
        assert p.report(step, 0, metrics) is None  # neither 10 steps nor 30 s yet
    clock.now += 1.0
    p.add_times(data_s=0.5, busy_s=10.0)
    line = p.report(10, 1, metrics)
    assert line == lines[-1]
    assert line.startswith("step 10/100 (10%) epoch 1 loss 0.2500 lr 3.00e-04 12.5 img/s data-wait 5% ETA ")
    assert line.endswith("ETA 1m30s")  # 10 steps in 10 s: 90 left at 1 step/s
    clock.now += 31.0  # a slow step: the time bound reports anyway
    assert p.report(11, 1, metrics) is not None
    assert p.report(100, 9, metrics) is not None  # the last step always reports


def test_a_resumed_run_estimates_from_its_own_pace():
    clock, lines = Clock(), []
    p = Progress(total=60, start_step=40, every_steps=1, every_s=30.0, clock=clock, write=lines.append)
    clock.now = 4.0
    p.report(42, 3, {"loss": 0.1, "lr": 1e-4, "images_per_s": 4.0})
    assert lines[-1].startswith("step 42/60 (70%)") and lines[-1].endswith("ETA 36s")  # 2 steps in 4 s, 18 left
