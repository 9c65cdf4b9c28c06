"""Curate images into a training dataset on Ray Data: filters with reasons, buckets, crops, shards.

    python flows/curate.py --config flows/configs/tiny.yaml [--set curate.output=/tmp/ds]
    ray job submit --working-dir . -- python flows/curate.py --config flows/configs/terminus_v2.yaml

The last line on stdout is one JSON object: output, report path, digest and the counts.
"""

from __future__ import annotations

import sys

from _common import banner, emit, fail, load, parser, setup_logging


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    cfg = load(args)  # validated before any cluster work
    setup_logging()

    from components.cluster import ray_session
    from components.curation.pipeline import curate
    from components.curation.sources import SourceError
    from components.dataset import REPORT, join
    from components.storage import StorageUnavailable

    banner(f"curate: {cfg.curate.source} -> {cfg.curate.output}")
    try:
        with ray_session():
            report = curate(cfg)
    except (SourceError, StorageUnavailable) as err:
        fail(str(err))
    drops = ", ".join(f"{k} {v}" for k, v in report["reasons"].items() if v) or "none"
    print(f"kept {report['kept']} of {report['inputs']} (dropped: {drops})", file=sys.stderr)
    emit({
        "output": cfg.curate.output, "report": join(cfg.curate.output, REPORT), "digest": report["digest"],
        "inputs": report["inputs"], "kept": report["kept"], "dropped": report["dropped"],
        "reasons": {k: v for k, v in report["reasons"].items() if v}, "splits": report["splits"],
        "images_per_s": report["images_per_s"], "mlflow_run_id": report.get("mlflow_run_id"),
        "latents": report.get("latents"),
    })


if __name__ == "__main__":
    main()
