"""How curation's Ray tasks and actors are launched: the resources they ask for and the settings
they get for S3."""

from __future__ import annotations

import os

from components.config import CurateConfig

# boto3's standard settings. Forwarded to the curation workers when the driver has them, so a run
# started with credentials in its environment (a Ray job, a test against a local S3) works on
# workers started without them; on a cluster with instance roles nothing is set and nothing travels.
AWS_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE",
           "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


def worker_args(cfg: CurateConfig, num_cpus: float) -> dict:
    """``ray_remote_args`` for the curation tasks, encoding actors and write tasks."""
    args: dict = {"num_cpus": num_cpus}
    if any(p.startswith("s3://") for p in (cfg.source, cfg.output, cfg.root or "")):
        env = {k: os.environ[k] for k in AWS_ENV if os.environ.get(k)}
        if env:
            args["runtime_env"] = {"env_vars": env}
    return args


def write_to(ds, sink, cfg: CurateConfig) -> None:
    """Run an actor pool's output ``ds`` into ``sink`` (the latent cache). Write tasks ask for no
    CPU, capped at one per actor instead: the actor pool may hold every CPU of a small machine, and
    a write task that waited for a core would stall the stream (outputs pile up, backpressure idles
    the actors, nothing frees a CPU). They only serialise parquet and upload."""
    ds.write_datasink(sink, ray_remote_args=worker_args(cfg, num_cpus=0), concurrency=cfg.cache_workers)
