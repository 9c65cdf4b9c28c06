"""How weak a damage the promotion gate detects on the demo's held-out set, and how often it refuses an
identical copy.

    python -m bench.gate_sensitivity --scales 0.5,0.2,0.1,0.05,0.02,0.01 --noise-seeds 11,12 \\
        --identical-seeds 0,1,2,3,4 --json OUT

The demo's curation (``flows/configs/tiny.yaml``: scikit-image's photos, 8 of the kept ones held out) runs
into a fresh state folder with its own SQLite MLflow. The champion is the demo's training run (``--champion
trained``: the tiny preset's full fine-tune on those photos, registered by the trainer) or the tiny model as
built (``--champion random``: its loss is a random network's, which noise barely moves); each challenger is
the champion's UNet with Gaussian noise added to every tensor (``scale`` x that tensor's std, one noise seed
each), registered, evaluated beside the champion by ``evaluate_version`` (the demo's validation timesteps and
held-out rows; generation shrunk to 64 px and 2 steps, which the gate's ``val_loss`` does not use) and promoted
to ``@staging`` through ``promote``. An identical copy is evaluated under several bootstrap seeds
(``cfg.seed``). The last stdout line is the JSON: ``{"rows", "tolerance", "noise": [{"scale", "seed", "change",
"low", "high", "refused"}], "identical": [...]}``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import mlflow
import torch

from components.cluster import ray_session
from components.config import load_config
from components.curation.pipeline import curate
from components.dataset import read_manifest
from components.diffusion.sdxl import load_parts, save_pipeline
from components.diffusion.tiny import build_tiny
from components.evaluation.run import evaluate_version
from components.registry.model import fetch_model, log_pipeline_model
from components.registry.promotion import PromotionRefused, promote
from components.registry.tracking import setup_tracking
from components.training.driver import run_training

REPO = Path(__file__).resolve().parents[1]
GENERATION_SMALL = [
    "evaluate.image_size=64", "evaluate.steps=2", "evaluate.seeds=[0]", "evaluate.num_prompts=6",
    "evaluate.dark_prompts=['a black cat in a dark room at night']",
    "evaluate.bright_prompts=['a white snowy field under a bright overcast sky']",
]


def add_noise(unet: torch.nn.Module, scale: float, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in unet.parameters():
            if p.numel() > 1:
                p.add_(torch.randn(p.shape, generator=gen) * scale * float(p.std()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scales", default="0.5,0.2,0.1,0.05,0.02,0.01")
    p.add_argument("--noise-seeds", default="11,12")
    p.add_argument("--identical-seeds", default="0,1,2,3,4")
    p.add_argument("--champion", choices=("trained", "random"), default="trained")
    p.add_argument("--state", default=None, help="state folder (default: a temporary one)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    scales = [float(s) for s in args.scales.split(",")]
    noise_seeds = [int(s) for s in args.noise_seeds.split(",")]
    identical_seeds = [int(s) for s in args.identical_seeds.split(",")]
    root = Path(args.state or tempfile.mkdtemp(prefix="gate-sensitivity-"))
    overrides = [f"state_dir={root}", f"tracking.tracking_uri=sqlite:///{root}/mlflow.db",
                 "tracking.registered_model=terminus-gate-bench", *GENERATION_SMALL]
    cfg = load_config(REPO / "flows/configs/tiny.yaml", overrides)
    started = time.monotonic()
    with ray_session(num_cpus=2):
        curate(cfg)
        trained = run_training(cfg) if args.champion == "trained" else None
    manifest = read_manifest(cfg.train.data)
    experiment = setup_tracking(cfg)
    name = cfg.tracking.registered_model
    cache = cfg.state_path("cache", "models")
    champion_dir = (fetch_model(f"models:/{name}/{trained.version}", cache).pipeline_dir
                    if trained is not None else None)

    def register(label: str, scale: float = 0.0, seed: int = 0) -> str:
        parts = load_parts(cfg.model, cache, str(champion_dir)) if champion_dir else build_tiny(cfg.model.tiny)
        if scale:
            add_noise(parts.unet, scale, seed)
        directory = save_pipeline(parts, cfg.diffusion, root / "pipelines" / label)
        with mlflow.start_run(experiment_id=experiment, run_name=label):
            return str(log_pipeline_model(directory, name, cfg.inference).registered_model_version)

    def eval_loss(version: str) -> float:
        return float(mlflow.MlflowClient().get_model_version(name, version).tags["eval.val_loss"])

    def judged(version: str, run_cfg) -> dict:
        out = evaluate_version(run_cfg, f"models:/{name}/{version}", manifest)
        verdict = {v["metric"]: v for v in out["verdicts"]}["val_loss"]
        try:
            promote(name, version, alias="staging", evaluate=run_cfg.evaluate)
            refused = None
        except PromotionRefused as err:
            refused = str(err)
        return {"change": verdict["change"], "low": verdict["low"], "high": verdict["high"],
                "verdict": verdict["verdict"], "refused": refused}

    champion = trained.version if trained is not None else register("champion")
    evaluate_version(cfg, f"models:/{name}/{champion}", manifest)
    promote(name, champion, evaluate=cfg.evaluate)
    noise = []
    for scale in scales:
        for seed in noise_seeds:
            row = {"scale": scale, "seed": seed, **judged(register(f"noise-{scale}-{seed}", scale, seed), cfg)}
            noise.append(row)
            print(json.dumps(row), flush=True)
    identical = []
    copy = register("identical")
    for seed in identical_seeds:
        row = {"bootstrap_seed": seed, **judged(copy, cfg.model_copy(update={"seed": seed}))}
        identical.append(row)
        print(json.dumps(row), flush=True)
    report = {"champion": args.champion, "champion_val_loss": eval_loss(champion), "rows": manifest.rows.get("val"),
              "tolerance": cfg.evaluate.gate["val_loss"], "confidence": cfg.evaluate.confidence,
              "resamples": cfg.evaluate.bootstrap_resamples, "val_timesteps": cfg.train.val_timesteps,
              "noise": noise, "identical": identical, "total_s": round(time.monotonic() - started, 1)}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
