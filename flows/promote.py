"""Promote a registered version to an alias (gated), or roll the alias back.

    python flows/promote.py --model terminus-tiny --version 3 [--alias champion]
    python flows/promote.py --model terminus-tiny --version 3 --force "hotfix approved by X"
    python flows/promote.py --model terminus-tiny --rollback
"""

from __future__ import annotations

from dataclasses import asdict

from _common import emit, fail, load, parser, setup_logging


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--model", help="registered model name (default: tracking.registered_model)")
    p.add_argument("--version", help="version to promote")
    p.add_argument("--alias", default="champion")
    p.add_argument("--tolerance", type=float, default=0.05, help="allowed relative val_loss regression")
    p.add_argument("--force", metavar="REASON", help="skip the gates; the reason is recorded on the version")
    p.add_argument("--rollback", action="store_true", help="point the alias back at the 'previous' version")
    args = p.parse_args()
    cfg = load(args)
    setup_logging()
    from components.promotion import PromotionRefused, promote, rollback
    from components.tracking import setup_tracking

    setup_tracking(cfg)
    name = args.model or cfg.tracking.registered_model
    try:
        if args.rollback:
            result = rollback(name, args.alias)
        elif args.version is None:
            fail("--version is required unless --rollback is given")
        else:
            result = promote(name, args.version, args.alias, args.tolerance, args.force)
    except PromotionRefused as err:
        fail(f"promotion refused: {err}", code=3)
    emit(asdict(result))


if __name__ == "__main__":
    main()
