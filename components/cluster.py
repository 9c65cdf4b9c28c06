"""Ray connection for every flow: the cluster named by RAY_ADDRESS (a Ray job, KubeRay), or a
local one started here, on loopback, and shut down by the same flow. The local one runs its dashboard on
127.0.0.1 (port 8265, or the next free one): users watch a flow there, and Ray Train's controller
queries the state API it serves."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager


@contextmanager
def ray_session(num_cpus: int | None = None, env_vars: dict[str, str] | None = None):
    import ray
    import ray.data

    if ray.is_initialized():
        yield
        return
    runtime_env = {"env_vars": env_vars} if env_vars else None
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], runtime_env=runtime_env)
    else:
        # Ray 2.60 maps a loopback node address to the host's own address for its internal
        # services; the servers this platform starts (Serve's HTTP proxy, MLflow, S3) bind 127.0.0.1.
        ray.init(
            address="local",  # always a new cluster, never one a stale /tmp/ray file points at
            num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1", _node_ip_address="127.0.0.1",
            runtime_env=runtime_env, configure_logging=True, log_to_driver=True,
        )
    if not sys.stderr.isatty():  # redrawn bars turn into hundreds of lines in a log file
        ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        yield
    finally:
        ray.shutdown()
