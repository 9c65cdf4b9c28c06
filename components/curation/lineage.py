"""Record a curation in MLflow: one run with the curate config, the counts, the report, and the
curated dataset (source = its ROOT, digest = the content digest) as a dataset input.

Training logs the same dataset object (``components.registry.tracking.mlflow_dataset``) as its own input, so
the lineage "which curated data did this model see" is one digest shared by both runs.
"""

from __future__ import annotations

from components import dataset
from components.config import Config
from components.registry.tracking import flatten, mlflow_dataset, setup_tracking


def log_curation(cfg: Config, report: dict) -> str:
    import mlflow

    experiment_id = setup_tracking(cfg)
    manifest = dataset.read_manifest(cfg.curate.output, cfg.curate.s3_endpoint_url)
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"curate-{report['digest']}") as run:
        mlflow.set_tags({"flow": "curate", "dataset.digest": report["digest"], "config.digest": cfg.digest()})
        mlflow.log_params(flatten(cfg.curate.model_dump(mode="json"), "curate."))
        metrics = {"inputs": report["inputs"], "kept": report["kept"], "dropped": report["dropped"]}
        metrics.update({f"dropped.{k}": v for k, v in report["reasons"].items()})
        metrics.update({f"rows.{k}": v for k, v in report["splits"].items()})
        if report.get("images_per_s"):
            metrics["images_per_s"] = report["images_per_s"]
        mlflow.log_metrics(metrics)
        mlflow.log_dict(report, "curation/report.json")
        mlflow.log_input(mlflow_dataset(manifest), context="curated")
        return run.info.run_id
