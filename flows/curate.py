"""Curate images into a training dataset on Ray Data: filters with reasons, buckets, crops, shards.

examples:
  python flows/curate.py                                         # the demo photos into <state_dir>/datasets/tiny
  python flows/curate.py --set curate.output=/tmp/ds --set curate.workers=4
  python flows/curate.py --config flows/configs/terminus_v2.yaml --dry-run   # its sources and their policies
  python flows/curate.py --config flows/configs/terminus_v2.yaml --print-config
  ray job submit --working-dir . -- python flows/curate.py --config flows/configs/terminus_v2.yaml \\
      --set state_dir=/mnt/terminus

The last line on stdout is one JSON object: output, report path, digest and the counts.
Exit codes: 0 curated, 1 the store failed during the run (nothing published), 2 bad input (a source, an
output, a store that is unreachable or refuses them, an S3 setting that cannot go to the workers), each one
redacted line.
"""

from __future__ import annotations

import sys

from flows._common import banner, emit, fail, load, parser, setup_logging


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--dry-run", action="store_true",
                   help="print each source with its filter policy, captions and mixture weight, then exit "
                        "(reads no data, starts nothing)")
    args = p.parse_args()
    cfg = load(args)  # validated before any cluster work
    setup_logging()
    if args.dry_run:
        # after parsing: --help and a refused command line load no Ray, MLflow or torch
        from components.curation.pipeline import policy_lines, source_meta

        for line in policy_lines(cfg.curate):
            print(line)
        emit({"output": cfg.curate.output, "sources": source_meta(cfg.curate),
              "captioner": cfg.curate.captioner.model, "download": cfg.curate.download.model_dump(mode="json")})
        return

    from components.cluster import ray_session
    from components.config import ConfigError
    from components.curation.pipeline import curate, prepare
    from components.curation.remote import check_worker_env
    from components.curation.sources import SourceError
    from components.dataset import REPORT, join
    from components.storage import StorageError

    banner(f"curate: {', '.join(s.name for s in cfg.curate.resolved_sources())} -> {cfg.curate.output}")
    try:
        check_worker_env(cfg)  # what the workers' runtime env would carry
        inputs = prepare(cfg)  # sources and output checked before Ray starts
    except (ConfigError, SourceError, StorageError) as err:
        fail(str(err))
    try:
        with ray_session():
            report = curate(cfg, inputs)
    except (ConfigError, SourceError) as err:
        fail(str(err))
    except StorageError as err:  # the store failed or refused during the run: the work failed
        fail(str(err), code=1)
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
