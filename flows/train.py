"""Fine-tune with the Terminus recipe on Ray Train; log to MLflow; register the result.

examples:
  python flows/train.py                                          # the tiny preset on this machine
  python flows/train.py --set train.max_steps=200 --set train.run_name=long-run
  python flows/train.py --config flows/configs/terminus_v2.yaml --dry-run    # config and memory plan
  python -m flows.train --print-config                           # every key, documented
  ray job submit --working-dir . --runtime-env deploy/job_runtime_env.yaml -- \\
      python flows/train.py --set state_dir=/mnt/terminus

Running again with the same train.run_name resumes from its latest checkpoint and MLflow run.
Exit codes: 0 registered (last stdout line: JSON), 1 training failed, 2 bad input.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict

from flows._common import banner, emit, fail, load, parser, setup_logging


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and memory plan, then exit")
    args = p.parse_args()
    cfg = load(args)  # validated before any cluster work
    setup_logging()
    if args.dry_run:
        # after parsing: --help and a refused command line load no Ray, MLflow or torch
        from components.training.memory.plan import plan_for

        print(json.dumps(cfg.model_dump(mode="json"), indent=2))
        print(plan_for(cfg).table())
        return

    from components.config import ConfigError, RecurringError
    from components.training.preflight import check_training

    try:
        check_training(cfg)  # before Ray starts: one line, exit 2
    except ConfigError as err:  # a preflight refusal, or a tracking server that does not answer
        fail(str(err))

    from components.cluster import ray_session
    from components.training.driver import TrainingFailed, run_training

    banner(f"train: {cfg.name} on {cfg.train.data}")
    try:
        with ray_session():
            result = run_training(cfg)
    except RecurringError as err:  # found by a worker, the same on every attempt: not retried
        fail(str(err))
    except TrainingFailed as err:
        fail(str(err), code=1)
    print(f"registered {result.model_name} version {result.version}", file=sys.stderr)
    emit(asdict(result))


if __name__ == "__main__":
    main()
