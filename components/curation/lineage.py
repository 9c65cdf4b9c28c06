"""Record a curation in MLflow: one run with the curate config, the counts (in all and per source), the
report, each source as a dataset input (``context="source"``, named by the source, with its location and
kind), and the curated dataset (source = its ROOT, digest = the content digest) as the ``curated`` input.

Training logs the same curated dataset object (``components.registry.tracking.mlflow_dataset``) as its own
input, so the lineage "which curated data did this model see" is one digest shared by both runs, and the
curation run names the sources that data came from.
"""

from __future__ import annotations

import hashlib
import json

from components import dataset
from components.config import SHORTHAND, Config
from components.registry.tracking import flatten, mlflow_dataset, setup_tracking, source_dataset


def log_curation(cfg: Config, report: dict) -> str:
    # mlflow on first use: the curation pipeline imports this module and logs only when curate.track is set
    import mlflow

    experiment_id = setup_tracking(cfg)
    manifest = dataset.read_manifest(cfg.curate.output, cfg.curate.s3_endpoint_url)
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"curate-{report['digest']}") as run:
        mlflow.set_tags({"flow": "curate", "dataset.digest": report["digest"], "config.digest": cfg.digest()})
        params = cfg.curate.model_dump(mode="json")
        sources = params.pop("sources")
        if sources:  # the one-source keys describe nothing here: only each source's own are logged
            for key in SHORTHAND:
                params.pop(key, None)
        mlflow.log_params(flatten(params, "curate."))
        for src in sources:  # by name: curate.sources.<name>.filters.max_watermark, ...
            mlflow.log_params(flatten(src, f"curate.sources.{src['name']}."))
        metrics = {"inputs": report["inputs"], "kept": report["kept"], "dropped": report["dropped"]}
        metrics.update({f"dropped.{k}": v for k, v in report["reasons"].items()})
        metrics.update({f"rows.{k}": v for k, v in report["splits"].items()})
        metrics.update({f"captions.{k}": v for k, v in report.get("captions", {}).items()})
        metrics.update({f"watermark.{k}": v for k, v in report.get("watermark", {}).items()})
        for name, s in report.get("sources", {}).items():
            metrics.update({f"source.{name}.inputs": s["inputs"], f"source.{name}.kept": s["kept"],
                            f"source.{name}.dropped": s["dropped"]})
            metrics.update({f"source.{name}.dropped.{k}": v for k, v in s["reasons"].items()})
            metrics.update({f"source.{name}.captions.{k}": v for k, v in s["captions"].items()})
            metrics.update({f"source.{name}.watermark.{k}": v for k, v in s["watermark"].items()})
        if report.get("images_per_s"):
            metrics["images_per_s"] = report["images_per_s"]
        mlflow.log_metrics(metrics)
        mlflow.log_dict(report, "curation/report.json")
        for name, s in report.get("sources", {}).items():
            counts = json.dumps({k: s[k] for k in ("inputs", "kept", "reasons")}, sort_keys=True)
            digest = hashlib.sha256(f"{s.get('location')}|{counts}".encode()).hexdigest()[:16]
            mlflow.log_input(source_dataset(name, s.get("location") or name, s.get("kind") or "files", digest),
                             context="source", tags={"source_name": name, "kind": s.get("kind") or "files"})
        mlflow.log_input(mlflow_dataset(manifest), context="curated",
                         tags={"sources": ",".join(report.get("sources", {}))})
        return run.info.run_id
