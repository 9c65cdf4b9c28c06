"""The whole platform on the embedded default: curate, train, evaluate, promote, serve, call.

    python flows/demo.py --config flows/configs/tiny.yaml      (what `make demo` runs)

Each stage runs through its own flow; the last stdout line is one JSON object:
{"model", "version", "alias", "image", "endpoint"}.
"""

from __future__ import annotations

import base64
import time

from _common import REPO, banner, emit, fail, load, parser, run_flow, setup_logging

PROMPT = "a photograph of an astronaut, high detail"


def serve_and_call(cfg, config_path: str, overrides: list[str], model: str, out_png) -> str:
    """Start the Serve app on loopback, wait until healthy, send one OpenAI-style request."""
    import requests
    import yaml
    from ray import serve

    from components.cluster import ray_session
    from deploy.app import build_app

    base = f"http://{cfg.serve.host}:{cfg.serve.port}"
    with ray_session():
        serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
        try:
            # The deployment options (autoscaling, queue limits, health checks) of deploy/serve.yaml.
            spec = yaml.safe_load((REPO / "deploy/serve.yaml").read_text())["applications"][0]
            options = {d.pop("name"): d for d in spec["deployments"]}
            app = build_app({"config": config_path, "overrides": overrides,
                             "model_options": options.get("Model", {}), "ingress_options": options.get("Ingress", {})})
            serve.run(app, name="terminus", route_prefix="/")
            deadline = time.time() + 300
            while requests.get(f"{base}/healthz", timeout=10).status_code != 200:
                if time.time() > deadline:
                    fail("Serve app did not become healthy within 300 s")
                time.sleep(1)
            size = cfg.serve.default_size
            resp = requests.post(
                f"{base}/v1/images/generations",
                json={"model": model, "prompt": PROMPT, "n": 1, "size": f"{size}x{size}",
                      "response_format": "b64_json", "seed": 0},
                timeout=300,
            )
            if resp.status_code != 200:
                fail(f"endpoint answered {resp.status_code}: {resp.text[:300]}")
            out_png.write_bytes(base64.b64decode(resp.json()["data"][0]["b64_json"]))
        finally:
            serve.shutdown()
    return f"{base}/v1/images/generations"


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    cfg = load(args)
    setup_logging()
    common = ["--config", args.config, *[x for o in args.overrides for x in ("--set", o)]]

    banner("1/5 curate: Ray Data filters, LANCZOS downsampling, crops with SDXL coordinates")
    curated = run_flow("curate.py", *common)
    banner(f"2/5 train: Ray Train, ZT-SNR v-prediction, min-SNR-gamma (curated {curated.get('kept')} images)")
    trained = run_flow("train.py", *common)
    model, version = trained["model_name"], trained["version"]
    uri = f"models:/{model}/{version}"
    banner(f"3/5 evaluate {uri}")
    run_flow("evaluate.py", *common, "--model-uri", uri)
    banner(f"4/5 promote {uri} to @champion")
    promoted = run_flow("promote.py", *common, "--model", model, "--version", version)
    banner(f"5/5 serve models:/{model}@champion on Ray Serve and call it")

    out_png = cfg.state_path("demo", f"{model}-v{version}.png")
    out_png.parent.mkdir(parents=True, exist_ok=True)
    endpoint = serve_and_call(cfg, str(REPO / args.config), args.overrides, model, out_png)
    emit({"model": model, "version": version, "alias": promoted["alias"], "image": str(out_png),
          "endpoint": endpoint})


if __name__ == "__main__":
    main()
