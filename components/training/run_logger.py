"""Rank-0 MLflow logging for a training run: live, and exact across restarts.

Per-step metrics and validation images are buffered in memory and written every ``train.log_flush_s``
seconds while training runs (the MLflow UI shows the loss curve of a running run), and always just
before a checkpoint is reported. A resumed run first reads how far the run's ``loss`` history goes and
drops what it recomputes up to there, so the history has no duplicated step (work redone after a crash
is not logged twice) and, since every step up to a checkpoint is written before the checkpoint exists,
no gap. Each ``log_batch`` call carries whole steps only, so a step is in MLflow entirely or not at all.

A tracking server that is down does not stop training (docs/reliability.md):

- before each flush a server URI is probed once (``/health``, a few seconds, no retries); when it
  does not answer, the flush is skipped at once instead of spending MLflow's own retries (about
  four minutes per call by default) at every checkpoint, and the buffer waits for the next flush;
  the flush's own calls retry briefly (``FLUSH_HTTP``): the buffer is the retry, so a server that
  dies in the middle of a flush costs seconds, not minutes;
- the unsent metrics are also written to ``<state>/unsent_metrics/<run_id>.jsonl`` (replaced
  atomically at each failed flush, removed after a good one), so a worker that dies during the
  outage does not lose them: the next ``RunLogger`` of the run re-queues them, and a step that the
  resumed worker recomputes replaces its unsent value (each (key, step) is written once);
- at the end, anything still unwritten after a few tries stays in that file and the run fails with
  one clear error line.

Validation images and checkpoint records buffered during an outage are not spilled: they are lost
if the worker also dies before the server is back. The server must answer when a worker (re)starts,
to say how far the history goes; a ``RunLogger`` that cannot know raises rather than guess.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import mlflow
import requests
from mlflow.entities import Metric

from components.config import Config
from components.registry.tracking import setup_tracking

log = logging.getLogger(__name__)
PROBE_TIMEOUT_S = 5.0
FLUSH_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
              "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
"""MLflow's HTTP retry settings (read at each call) while a flush runs; the process's own come back after."""
CLOSE_RETRY_DELAYS_S = (1, 2, 4, 8)
LIVE_BACKOFF_MAX_S = 120.0
"""After a failed live flush the interval (``train.log_flush_s``) doubles, up to this."""
BATCH_LIMIT = 1000  # MLflow's log_batch takes at most 1000 metrics
SYSTEM_METRICS_STOP_S = 15.0


@contextmanager
def _scoped_env(values: dict[str, str]):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def server_reachable(uri: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """True for a store that is not a server (SQLite, files), or a server that answers HTTP at all.

    Any HTTP status counts as an answer (an auth proxy's 401 is a live server); only a refused,
    reset or timed-out connection counts as down.
    """
    if not uri.startswith(("http://", "https://")):
        return True
    try:
        requests.get(f"{uri.rstrip('/')}/health", timeout=timeout)
        return True
    except requests.RequestException:
        return False


def _whole_steps(metrics: list[Metric], limit: int) -> int:
    """How many leading metrics to send in one call: as many as fit in ``limit`` without splitting a
    step (the buffer holds steps in order); a single step larger than ``limit`` goes alone, split."""
    if len(metrics) <= limit:
        return len(metrics)
    cut = limit
    while cut > 0 and metrics[cut].step == metrics[cut - 1].step:
        cut -= 1
    return cut or limit


class RunLogger:
    def __init__(self, cfg: Config, run_id: str):
        setup_tracking(cfg)
        self.cfg = cfg
        self.run_id = run_id
        self.uri = mlflow.get_tracking_uri()
        self.client = mlflow.MlflowClient()
        self.spill = cfg.state_path("unsent_metrics", f"{run_id}.jsonl")
        self._metrics: list[Metric] = []
        self._images: list[tuple] = []
        self._records: list[tuple[str, dict]] = []
        self.logged_through = self._last_logged_step()
        self._live_every = cfg.train.log_flush_s
        self._next_live = time.monotonic() + self._live_every
        self._recovered = self._load_spill()
        self._system = None
        try:
            # inside the try: failing to import or start it turns system metrics off
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._system = SystemMetricsMonitor(
                run_id, sampling_interval=10, samples_before_logging=1, resume_logging=True,
                tracking_uri=mlflow.get_tracking_uri(),
            )
            self._system.start()
        except Exception as err:  # system metrics are a nicety: never fail training for them
            log.warning("system metrics off: %s", err)

    def _last_logged_step(self) -> int:
        try:
            history = self.client.get_metric_history(self.run_id, "loss")
        except Exception as err:
            raise RuntimeError(
                f"MLflow at {self.uri} did not answer when training (re)started, so the steps already "
                f"logged are unknown ({str(err).splitlines()[0][:200]}); start it again, then rerun"
            ) from None
        return max((m.step for m in history), default=0)

    def _load_spill(self) -> bool:
        """Re-queue metrics a previous worker of this run could not send (newer than the history)."""
        if not self.spill.exists():
            return False
        for line in self.spill.read_text().splitlines():
            m = json.loads(line)
            if m["step"] > self.logged_through:
                self._metrics.append(Metric(m["key"], m["value"], m["timestamp"], m["step"]))
        log.info("re-queued %d unsent metrics from %s", len(self._metrics), self.spill)
        return bool(self._metrics)

    def _write_spill(self) -> None:
        self.spill.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.spill.with_name(f".{self.spill.name}.{os.getpid()}.tmp")
        with tmp.open("w") as fh:
            for m in self._metrics:
                fh.write(json.dumps({"key": m.key, "value": m.value, "step": m.step, "timestamp": m.timestamp}) + "\n")
        tmp.replace(self.spill)  # atomic: a crash leaves the old spill or the new one, never half

    def metrics(self, values: dict[str, float], step: int) -> None:
        if step <= self.logged_through:
            return  # already in MLflow from an attempt that crashed after logging it
        if self._recovered:  # a recomputed step replaces the value a dead worker could not send
            self._metrics = [m for m in self._metrics if not (m.key in values and m.step >= step)]
        now = int(time.time() * 1000)
        self._metrics += [Metric(k, float(v), now, step) for k, v in values.items()]

    def set_tags(self, tags: dict[str, str]) -> None:
        """Tags of the run, set now (a failure only warns: tags are a nicety, training goes on)."""
        try:
            for key, value in tags.items():
                self.client.set_tag(self.run_id, key, value)
        except Exception as err:
            log.warning("could not tag run %s: %s", self.run_id, str(err).splitlines()[0][:200] if str(err) else err)

    def maybe_flush(self) -> None:
        """A live flush, when ``train.log_flush_s`` has passed (longer after a failed one)."""
        if time.monotonic() < self._next_live:
            return
        ok = self.flush()
        every = self.cfg.train.log_flush_s
        self._live_every = every if ok else min(max(self._live_every, 1.0) * 2, LIVE_BACKOFF_MAX_S)
        self._next_live = time.monotonic() + self._live_every

    def image(self, image, key: str, step: int) -> None:
        if step > self.logged_through:
            self._images.append((image, key, step))

    def checkpoint(self, name: str, step: int, report: dict) -> None:
        """Record a checkpoint that Ray has persisted (its storage URI, step and metrics)."""
        uri = f"{self.cfg.train.storage_path.rstrip('/')}/{self.cfg.train.run_name}/{name}"
        self._records.append((f"checkpoints/{name}.json", {"step": step, "metrics": report, "uri": uri}))
        self.flush()

    def flush(self) -> bool:
        if not (self._metrics or self._images or self._records):
            return True
        if not server_reachable(self.uri):
            self._unsent(f"no answer from {self.uri}/health")
            return False
        try:
            with _scoped_env(FLUSH_HTTP):
                self._send()
        except Exception as err:
            self._unsent(str(err).splitlines()[0][:200] if str(err) else type(err).__name__)
            return False
        self.spill.unlink(missing_ok=True)
        return True

    def _send(self) -> None:
        """Metrics, then images, then checkpoint records; each leaves the buffer once MLflow has it."""
        while self._metrics:  # whole steps per call, at most BATCH_LIMIT metrics; a sent batch is never resent
            n = _whole_steps(self._metrics, BATCH_LIMIT)
            self.client.log_batch(self.run_id, metrics=self._metrics[:n])
            del self._metrics[:n]
        self._recovered = False
        while self._images:
            image, key, step = self._images[0]
            self.client.log_image(self.run_id, image, key=key, step=step)
            self._images.pop(0)
        while self._records:
            path, record = self._records[0]
            self.client.log_dict(self.run_id, record, path)
            self.client.set_tag(self.run_id, "checkpoint.latest", record["uri"])
            self._records.pop(0)

    def _unsent(self, why: str) -> None:
        if self._metrics:
            self._write_spill()
        log.warning("MLflow unreachable, keeping %d metrics for the next flush (also in %s): %s",
                    len(self._metrics), self.spill, why)

    def _stop_system_metrics(self) -> None:
        """MLflow's monitor joins its thread, which may sit in MLflow's retries during an outage:
        wait a bounded time, then leave the daemon thread behind."""
        if self._system is None:
            return
        stopper = threading.Thread(target=self._system.finish, daemon=True, name="stop-system-metrics")
        stopper.start()
        stopper.join(SYSTEM_METRICS_STOP_S)
        if stopper.is_alive():
            log.warning("system metrics monitor did not stop within %.0f s; left behind", SYSTEM_METRICS_STOP_S)

    def close(self) -> None:
        self._stop_system_metrics()
        for delay in CLOSE_RETRY_DELAYS_S:
            if self.flush():
                return
            time.sleep(delay)
        if self.flush():
            return
        self._write_spill()
        raise RuntimeError(
            f"MLflow unreachable at the end of training; {len(self._metrics)} metrics kept in {Path(self.spill)}"
        )
