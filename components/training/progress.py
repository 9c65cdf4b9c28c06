"""The console progress of a training run (rank 0): one line per ``train.log_every`` steps, or at least
every ``train.log_every_s`` seconds, with step/total, epoch, loss, LR, images/s, the share of time spent
waiting for data, and the time left.

Plain lines rather than a redrawn bar: a Ray worker's output reaches the driver's console through Ray's
log forwarding, never a terminal, and a line per report keeps logs readable when stderr is a file. The
lines go through ``logging`` (Ray Train V2 tees a worker's ``print`` to its logger as well, so a print
would show twice).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field


def duration(seconds: float) -> str:
    """``75`` -> ``1m15s``; ``3725`` -> ``1h02m``."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


@dataclass
class Progress:
    total: int
    start_step: int
    every_steps: int
    every_s: float
    clock: Callable[[], float] = time.monotonic
    write: Callable[[str], None] = logging.getLogger("terminus.progress").info
    started: float = field(init=False)
    last_print: float = field(init=False)
    last_step: int = field(init=False)
    data_s: float = 0.0
    busy_s: float = 0.0

    def __post_init__(self):
        self.started = self.last_print = self.clock()
        self.last_step = self.start_step

    def add_times(self, data_s: float, busy_s: float) -> None:
        """Seconds spent waiting for (and decoding) data, and seconds spent in the whole step."""
        self.data_s += data_s
        self.busy_s += busy_s

    def line(self, step: int, epoch: int, metrics: dict) -> str:
        now = self.clock()
        done = step - self.start_step
        rate = done / max(now - self.started, 1e-9)  # steps/s this attempt, validation included
        eta = (self.total - step) / rate if rate > 0 else float("inf")
        wait = self.data_s / self.busy_s if self.busy_s > 0 else 0.0
        return (f"step {step}/{self.total} ({step / self.total:.0%}) epoch {epoch} loss {metrics['loss']:.4f} "
                f"lr {metrics['lr']:.2e} {metrics['images_per_s']:.1f} img/s data-wait {wait:.0%} "
                f"ETA {duration(eta)}")

    def due(self, step: int) -> bool:
        return (step - self.last_step >= self.every_steps or self.clock() - self.last_print >= self.every_s
                or step == self.total)

    def report(self, step: int, epoch: int, metrics: dict) -> str | None:
        """Print (and return) the progress line when one is due."""
        if not self.due(step):
            return None
        text = self.line(step, epoch, metrics)
        self.write(text)
        self.last_print, self.last_step = self.clock(), step
        self.data_s = self.busy_s = 0.0
        return text
