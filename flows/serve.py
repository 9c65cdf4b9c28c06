"""Serve the registered model (models:/NAME@champion by default) on Ray Serve as an OpenAI-compatible
Images API, on loopback, until interrupted.

examples:
  python flows/serve.py                                   # a local Ray; http://127.0.0.1:8000
  python flows/serve.py --set serve.model_uri=models:/terminus-tiny/2 --set serve.port=8080
  RAY_ADDRESS=auto python flows/serve.py --detach         # deploy onto a running cluster and return
  curl -s http://127.0.0.1:8000/v1/images/generations -H 'Content-Type: application/json' \\
       -d '{"prompt": "a lighthouse at dusk", "size": "256x256"}'

Deployment options (autoscaling, queue limits, resources) come from deploy/serve.yaml. A local Ray started here
runs Serve with its latency settings (components/cluster.py SERVE_ENV; a value already in the environment wins); on
a cluster (RAY_ADDRESS) they belong in the environment Ray was started with.
Exit codes: 0 stopped (or deployed with --detach), 1 the app did not become healthy, 2 bad input.
"""

from __future__ import annotations

import socket
import sys
import time
from pathlib import Path

from components.training.preflight import local_cluster
from flows._common import banner, emit, fail, load, parser, setup_logging


def check_port_free(host: str, port: int) -> None:
    """Refuse in one line when ``host:port`` is taken on this machine (Serve's proxy would fail to bind after
    Ray started)."""
    from components.config import ConfigError

    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as err:
            raise ConfigError(f"serve.port {port} on {host} is taken ({err.strerror}): stop what holds it, or "
                              "choose another with --set serve.port=N") from None


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--detach", action="store_true", help="return once the app is healthy (on a cluster: keep it)")
    args = p.parse_args()
    cfg = load(args)
    setup_logging()
    # after parsing: --help and a refused command line load no Ray, MLflow or torch
    from components.cluster import ray_session
    from components.config import ConfigError
    from components.registry.model import ModelUriError, check_version
    from components.registry.tracking import check_tracking
    from deploy.launch import NotHealthy, start

    uri = cfg.serve.model_uri or f"models:/{cfg.tracking.registered_model}@champion"
    try:  # before Ray starts: the server answers, the version exists, the port is free
        check_tracking(cfg)
        check_version(cfg, uri)
        if local_cluster():
            check_port_free(cfg.serve.host, cfg.serve.port)
    except (ModelUriError, ConfigError) as err:
        fail(str(err))
    banner(f"serve {uri} on http://{cfg.serve.host}:{cfg.serve.port}")
    with ray_session(serve_latency=True):  # Serve's latency settings for a local Ray (components/cluster.py)
        try:
            base = start(cfg, str(Path(args.config).resolve()), args.overrides)
        except NotHealthy as err:
            fail(str(err), code=1)
        emit({"model_uri": uri, "endpoint": f"{base}/v1/images/generations"})
        if args.detach:
            return
        print("serving; Ctrl-C stops", file=sys.stderr, flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
