"""Print the single-GPU memory plan of a preset and whether it fits one A100-80G (no GPU, no network).

    python flows/plan.py --config flows/configs/terminus_v2.yaml [--set train.optimizer=adamw] [--json]

Exit status 0 when the plan fits, 1 when it does not, 2 on a bad config.
"""

from __future__ import annotations

import json

from _common import fail, load, parser


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print the plan as one JSON object instead of a table")
    p.add_argument("--capacity-gib", type=float, default=80.0, help="device memory in GiB (default: A100-80G)")
    args = p.parse_args()
    cfg = load(args)

    from components.training.memory.plan import plan_for

    try:
        plan = plan_for(cfg, capacity=int(args.capacity_gib * 2**30))
    except ValueError as err:
        fail(str(err))
    print(json.dumps(plan.to_dict()) if args.json else plan.table(), flush=True)
    raise SystemExit(0 if plan.fits else 1)


if __name__ == "__main__":
    main()
