"""Fine-tune with the Terminus recipe on Ray Train; log to MLflow; register the result.

    python flows/train.py --config flows/configs/tiny.yaml [--set train.max_steps=100] [--dry-run]
    ray job submit --working-dir . -- python flows/train.py --config flows/configs/tiny.yaml
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict

from _common import banner, emit, fail, load, parser, setup_logging


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and memory plan, then exit")
    args = p.parse_args()
    cfg = load(args)  # validated before any cluster work
    setup_logging()
    if args.dry_run:
        from components.training.memory.plan import plan_for

        print(json.dumps(cfg.model_dump(mode="json"), indent=2))
        print(plan_for(cfg).table())
        return

    from components.cluster import ray_session
    from components.dataset import IncompleteDatasetError
    from components.training.driver import run_training

    banner(f"train: {cfg.name} on {cfg.train.data}")
    try:
        with ray_session():
            result = run_training(cfg)
    except IncompleteDatasetError as err:
        fail(str(err))
    print(f"registered {result.model_name} version {result.version}", file=sys.stderr)
    emit(asdict(result))


if __name__ == "__main__":
    main()
