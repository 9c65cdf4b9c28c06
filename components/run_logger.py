"""Rank-0 MLflow logging for a training run, buffered up to each checkpoint.

Per-step metrics and validation images are held in memory and written just before a checkpoint
is reported. A resumed run first reads how far the run's ``loss`` history goes and drops what it
recomputes up to there, so the history has no duplicated step (work redone after a crash is not
logged twice) and no gap (everything up to the checkpoint was written before it). If the tracking
server is down at a flush, training goes on and the buffer is written at the next checkpoint (or
at the end); at the end, anything still unwritten is kept on disk under the state directory and
the run fails with one clear error line.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import mlflow
from mlflow.entities import Metric

from components.config import Config
from components.tracking import setup_tracking, state_path

log = logging.getLogger(__name__)


class RunLogger:
    def __init__(self, cfg: Config, run_id: str):
        setup_tracking(cfg)
        self.cfg = cfg
        self.run_id = run_id
        self.client = mlflow.MlflowClient()
        self._metrics: list[Metric] = []
        self._images: list[tuple] = []
        self._records: list[tuple[str, dict]] = []
        self.logged_through = self._last_logged_step()
        self._system = None
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._system = SystemMetricsMonitor(run_id, sampling_interval=10, samples_before_logging=1)
            self._system.start()
        except Exception as err:  # system metrics are a nicety: never fail training for them
            log.warning("system metrics off: %s", err)

    def _last_logged_step(self) -> int:
        try:
            history = self.client.get_metric_history(self.run_id, "loss")
        except Exception as err:
            log.warning("cannot read the run's history (%s); logging every step", str(err).splitlines()[0][:200])
            return 0
        return max((m.step for m in history), default=0)

    def metrics(self, values: dict[str, float], step: int) -> None:
        if step <= self.logged_through:
            return  # already in MLflow from an attempt that crashed after logging it
        now = int(time.time() * 1000)
        self._metrics += [Metric(k, float(v), now, step) for k, v in values.items()]

    def image(self, image, key: str, step: int) -> None:
        if step > self.logged_through:
            self._images.append((image, key, step))

    def checkpoint(self, name: str, step: int, report: dict) -> None:
        """Record a checkpoint that Ray has persisted (its storage URI, step and metrics)."""
        uri = f"{self.cfg.train.storage_path.rstrip('/')}/{self.cfg.train.run_name}/{name}"
        self._records.append((f"checkpoints/{name}.json", {"step": step, "metrics": report, "uri": uri}))
        self.flush()

    def flush(self) -> bool:
        try:
            for i in range(0, len(self._metrics), 1000):
                self.client.log_batch(self.run_id, metrics=self._metrics[i : i + 1000])
            self._metrics = []
            while self._images:
                image, key, step = self._images[0]
                self.client.log_image(self.run_id, image, key=key, step=step)
                self._images.pop(0)
            while self._records:
                path, record = self._records[0]
                self.client.log_dict(self.run_id, record, path)
                self.client.set_tag(self.run_id, "checkpoint.latest", record["uri"])
                self._records.pop(0)
            return True
        except Exception as err:
            log.warning("MLflow unreachable, keeping %d metrics for the next flush: %s",
                        len(self._metrics), str(err).splitlines()[0][:200])
            return False

    def close(self) -> None:
        if self._system is not None:
            self._system.finish()
        for delay in (1, 2, 4, 8):
            if self.flush():
                return
            time.sleep(delay)
        spill = state_path(self.cfg, "unsent_metrics", f"{self.run_id}.jsonl")
        spill.parent.mkdir(parents=True, exist_ok=True)
        with Path(spill).open("a") as fh:
            for m in self._metrics:
                fh.write(json.dumps({"key": m.key, "value": m.value, "step": m.step, "timestamp": m.timestamp}) + "\n")
        raise RuntimeError(f"MLflow unreachable at the end of training; {len(self._metrics)} metrics kept in {spill}")
