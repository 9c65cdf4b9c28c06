"""The whole platform on the embedded default: curate, train, evaluate, promote, serve, call.

examples:
  make demo                                          # set-up, then this
  python flows/demo.py                               # the tiny preset: local Ray, SQLite MLflow, .state/
  python flows/demo.py --set train.max_steps=30 --set serve.port=8081

Each stage runs through its own flow, as a user would run it, on one local Ray cluster that the demo
starts first and stops last (the flows join it through RAY_ADDRESS, as they join a cluster started with
`ray start`; its dashboard is on http://127.0.0.1:8265 while the demo runs). A summary of the stage
times ends the run, and the last stdout line is one JSON object: {"model", "version", "alias", "image",
"endpoint", "stages_s"}.
"""

from __future__ import annotations

import base64
import os
import sys
import time
from pathlib import Path

from flows._common import banner, emit, fail, load, parser, run_flow, setup_logging

PROMPT = "a photograph of an astronaut, high detail"


def serve_and_call(cfg, config_path: str, overrides: list[str], model: str, out_png: Path) -> str:
    """Start the Serve app on loopback (on the demo's cluster), wait until healthy, send one OpenAI-style
    request."""
    import requests  # on first use: --help loads neither requests nor Ray

    from deploy.launch import NotHealthy, remove, start, stop

    try:
        base = start(cfg, config_path, overrides)
        size = cfg.serve.default_size
        resp = requests.post(
            f"{base}/v1/images/generations",
            json={"model": model, "prompt": PROMPT, "n": 1, "size": f"{size}x{size}",
                  "response_format": "b64_json", "seed": 0},
            timeout=300,
        )
        if resp.status_code != 200:
            fail(f"endpoint answered {resp.status_code}: {resp.text[:300]}", code=1)
        out_png.write_bytes(base64.b64decode(resp.json()["data"][0]["b64_json"]))
    except NotHealthy as err:
        fail(str(err), code=1)
    finally:
        # A cluster of the user's (RAY_ADDRESS) keeps nothing of the demo; the demo's own stops with everything on it.
        if os.environ.get("RAY_ADDRESS"):
            stop()
        else:
            remove()
    return f"{base}/v1/images/generations"


def main() -> None:
    args = parser(__doc__).parse_args()
    cfg = load(args)
    setup_logging()
    import ray  # after parsing: --help and a refused command line load no Ray, MLflow or torch

    from components.cluster import ray_session

    with ray_session(serve_latency=True):  # its serve stage runs with Serve's latency settings (components/cluster.py)
        run_stages(cfg, args, dict(os.environ, RAY_ADDRESS=ray.get_runtime_context().gcs_address))


def run_stages(cfg, args, env: dict[str, str]) -> None:
    common = ["--config", args.config, *[x for o in args.overrides for x in ("--set", o)]]
    stages: dict[str, float] = {}

    def stage(name: str, text: str):
        banner(text)
        stages[name] = time.perf_counter()

    def done(name: str) -> None:
        stages[name] = round(time.perf_counter() - stages[name], 1)

    stage("curate", "1/5 curate: Ray Data filters, LANCZOS downsampling, crops with SDXL coordinates")
    curated = run_flow("curate.py", *common, env=env)
    done("curate")
    stage("train", f"2/5 train: Ray Train, ZT-SNR v-prediction, min-SNR-gamma (curated {curated.get('kept')} images)")
    trained = run_flow("train.py", *common, env=env)
    done("train")
    model, version = trained["model_name"], trained["version"]
    uri = f"models:/{model}/{version}"
    stage("evaluate", f"3/5 evaluate {uri}")
    run_flow("evaluate.py", *common, "--model-uri", uri, env=env)
    done("evaluate")
    stage("promote", f"4/5 promote {uri} to @champion")
    promoted = run_flow("promote.py", *common, "--model", model, "--version", version, env=env)
    done("promote")
    stage("serve", f"5/5 serve models:/{model}@champion on Ray Serve and call it")
    out_png = cfg.state_path("demo", f"{model}-v{version}.png")
    out_png.parent.mkdir(parents=True, exist_ok=True)
    endpoint = serve_and_call(cfg, str(Path(args.config).resolve()), args.overrides, model, out_png)
    done("serve")
    banner("done: " + ", ".join(f"{k} {v:.0f} s" for k, v in stages.items())
           + f"; total {sum(stages.values()):.0f} s")
    if cfg.model.source == "tiny":
        print("the tiny model is built from random weights and trained for a minute: its image is coloured noise, "
              "not a picture; the same chain draws pictures from a real checkpoint (--config "
              "flows/configs/terminus_v2.yaml, model.source=<hub id, folder, s3:// or .safetensors>)",
              file=sys.stderr, flush=True)
    print(f"image: {out_png}\nMLflow UI: .venv/bin/mlflow ui --backend-store-uri sqlite:///{cfg.state_path('mlflow.db')}"
          " --host 127.0.0.1   (then http://127.0.0.1:5000)", file=sys.stderr, flush=True)
    emit({"model": model, "version": version, "alias": promoted["alias"], "image": str(out_png),
          "endpoint": endpoint, "stages_s": stages})


if __name__ == "__main__":
    main()
