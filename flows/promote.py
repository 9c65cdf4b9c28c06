"""Promote a registered version to an alias (gated), or roll the alias back.

examples:
  python flows/promote.py --model terminus-tiny --version 3                    # to @champion, if it passes
  python flows/promote.py --model terminus-tiny --version 3 --alias staging
  python flows/promote.py --model terminus-tiny --version 3 --force "hotfix approved by X"
  python flows/promote.py --model terminus-tiny --rollback

Exit codes: 0 promoted / rolled back (last stdout line: JSON), 2 bad input (no such model or version,
a malformed command line), 3 refused by a gate.
"""

from __future__ import annotations

from dataclasses import asdict

from flows._common import REFUSED, emit, fail, load, parser, setup_logging


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--model", help="registered model name (default: tracking.registered_model)")
    p.add_argument("--version", help="version to promote")
    p.add_argument("--alias", default="champion")
    p.add_argument("--tolerance", type=float, default=None,
                   help="allowed relative val_loss regression (default: evaluate.gate's val_loss)")
    p.add_argument("--force", metavar="REASON", help="skip the gates; the reason is recorded on the version")
    p.add_argument("--rollback", action="store_true", help="point the alias back at its previous version")
    args = p.parse_args()
    cfg = load(args)
    if args.rollback and (args.version or args.force):
        fail("--rollback takes no --version or --force: it restores the alias's previous version")
    if not args.rollback and args.version is None:
        fail("--version is required unless --rollback is given")
    setup_logging()
    import mlflow  # after parsing: --help and a refused command line load no Ray, MLflow or torch

    from components.registry.model import ModelUriError
    from components.registry.promotion import PromotionRefused, promote, rollback
    from components.registry.tracking import TrackingUnavailable, check_tracking, setup_tracking

    gate = dict(cfg.evaluate.gate)
    if args.tolerance is not None:
        gate["val_loss"] = args.tolerance
    name = args.model or cfg.tracking.registered_model
    try:
        check_tracking(cfg)
        setup_tracking(cfg)
        if args.rollback:
            result = rollback(name, args.alias)
        else:
            result = promote(name, args.version, args.alias, gate, args.force, evaluate=cfg.evaluate)
    except PromotionRefused as err:
        fail(f"promotion refused: {err}", code=REFUSED)
    except (ModelUriError, TrackingUnavailable) as err:
        fail(str(err))
    except mlflow.exceptions.MlflowException as err:
        fail(f"registry error ({err.error_code}): {str(err.message).splitlines()[0]}")
    emit(asdict(result))


if __name__ == "__main__":
    main()
