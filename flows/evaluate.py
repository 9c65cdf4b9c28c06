"""Evaluate a registered version on the held-out split; record eval.* tags for promotion.

    python flows/evaluate.py --config flows/configs/tiny.yaml --model-uri models:/terminus-tiny/3
"""

from __future__ import annotations

from _common import emit, fail, load, parser, setup_logging


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--model-uri", required=True, help="models:/NAME/VERSION or models:/NAME@ALIAS")
    args = p.parse_args()
    cfg = load(args)
    setup_logging()
    import mlflow

    from components.dataset import IncompleteDatasetError, read_manifest
    from components.evaluation import evaluate_version
    from components.registry.model import ModelUriError

    try:
        emit(evaluate_version(cfg, args.model_uri, read_manifest(cfg.train.data)))
    except (IncompleteDatasetError, ModelUriError) as err:
        fail(str(err))
    except mlflow.exceptions.MlflowException as err:
        fail(f"registry error ({err.error_code}): {str(err.message).splitlines()[0]}")


if __name__ == "__main__":
    main()
