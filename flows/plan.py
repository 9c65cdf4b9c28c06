"""Print the single-GPU memory plan of a preset and whether it fits one A100-80G (no GPU, no network).

examples:
  python flows/plan.py --config flows/configs/terminus_v2.yaml
  python flows/plan.py --config flows/configs/terminus_v2.yaml --set train.optimizer=adamw --json
  python flows/plan.py --config flows/configs/terminus_v2.yaml --capacity-gib 40

The plan also states the host memory of registering the trained version (the base model in fp32 once,
the checkpoint streamed in), which train.export_memory_gb should cover on a cluster, and of exporting a
version as one fp16 file (streamed: the largest model in fp16).
Exit status 0 when the plan fits, 1 when it does not, 2 on a bad config.
"""

from __future__ import annotations

import json

from flows._common import fail, load, parser


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--json", action="store_true", help="print the plan as one JSON object instead of a table")
    p.add_argument("--capacity-gib", type=float, default=80.0, help="device memory in GiB (default: A100-80G)")
    args = p.parse_args()
    cfg = load(args)

    # after parsing: --help and a refused command line load no Ray, MLflow or torch
    from components.training.memory.plan import plan_for

    try:
        plan = plan_for(cfg, capacity=int(args.capacity_gib * 2**30))
    except ValueError as err:
        fail(str(err))
    print(json.dumps(plan.to_dict()) if args.json else plan.table(), flush=True)
    raise SystemExit(0 if plan.fits else 1)


if __name__ == "__main__":
    main()
