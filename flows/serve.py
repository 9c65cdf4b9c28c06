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

import sys
import time
from pathlib import Path

from flows._common import banner, emit, fail, load, parser, setup_logging


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--detach", action="store_true", help="return once the app is healthy (on a cluster: keep it)")
    args = p.parse_args()
    cfg = load(args)
    setup_logging()
    # after parsing: --help and a refused command line load no Ray, MLflow or torch
    from components.cluster import ray_session
    from components.registry.model import ModelUriError, parse_model_uri
    from deploy.launch import NotHealthy, start

    uri = cfg.serve.model_uri or f"models:/{cfg.tracking.registered_model}@champion"
    try:
        parse_model_uri(uri)
    except ModelUriError as err:
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
