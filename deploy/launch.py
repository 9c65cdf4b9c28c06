"""Starting the Serve application from Python with the deployment options of ``deploy/serve.yaml``
(what ``flows/serve.py`` and ``flows/demo.py`` do; ``serve run deploy/serve.yaml`` does the same from
the CLI). Needs a Ray session."""

from __future__ import annotations

import time
from pathlib import Path

import requests
import yaml
from ray import serve

from components.config import Config
from deploy.app import build_app

SERVE_YAML = Path(__file__).resolve().parent / "serve.yaml"


class NotHealthy(RuntimeError):
    pass


def deployment_options(path: Path = SERVE_YAML) -> dict[str, dict]:
    """Each deployment's options (autoscaling, queue limits, health checks, resources) from the Serve YAML."""
    spec = yaml.safe_load(path.read_text())["applications"][0]
    return {d["name"]: {k: v for k, v in d.items() if k != "name"} for d in spec["deployments"]}


def start(cfg: Config, config_path: str, overrides: list[str], name: str = "terminus",
          healthy_timeout_s: float = 300.0) -> str:
    """Deploy the app on loopback (``serve.host``/``serve.port``); returns its base URL once it answers (within
    ``healthy_timeout_s``: a replica loading SDXL on a CPU takes minutes)."""
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    options = deployment_options()
    app = build_app({"config": config_path, "overrides": overrides, "model_options": options.get("Model", {}),
                     "ingress_options": options.get("Ingress", {})})
    serve.run(app, name=name, route_prefix="/")
    base = f"http://{cfg.serve.host}:{cfg.serve.port}"
    wait_healthy(base, healthy_timeout_s)
    return base


def stop() -> None:
    """Shut the Serve application and its controller down."""
    serve.shutdown()


def remove(name: str = "terminus") -> None:
    """Delete the application ``name``, leaving Serve's controller and proxy to the cluster: on a local Ray that is
    about to stop, they stop with it, and Ray logs no failed task for a controller that killed itself (which
    ``serve.shutdown`` makes it do)."""
    serve.delete(name)


def wait_healthy(base: str, timeout_s: float = 300.0) -> None:
    """Until ``/healthz`` answers 200 (a model replica has its version loaded)."""
    deadline = time.time() + timeout_s
    while True:
        try:
            if requests.get(f"{base}/healthz", timeout=10).status_code == 200:
                return
        except requests.RequestException:
            pass
        if time.time() > deadline:
            raise NotHealthy(f"the Serve app at {base} did not become healthy within {timeout_s:.0f} s")
        time.sleep(1)
