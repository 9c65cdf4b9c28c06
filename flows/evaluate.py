"""Evaluate a registered version on the held-out split; record eval.* tags for promotion.

examples:
  python flows/evaluate.py --model-uri models:/terminus-tiny/3
  python flows/evaluate.py --model-uri models:/terminus-tiny@champion --set train.data=/data/curated

Exit codes: 0 evaluated (last stdout line: JSON), 2 bad input (no such version, no curated dataset).
"""

from __future__ import annotations

from flows._common import emit, fail, load, parser, setup_logging


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--model-uri", required=True, help="models:/NAME/VERSION or models:/NAME@ALIAS")
    args = p.parse_args()
    cfg = load(args)
    # after parsing: --help and a refused command line load no Ray, MLflow or torch
    from components.config import ConfigError
    from components.registry.model import ModelUriError, check_version, parse_model_uri
    from components.registry.tracking import check_tracking
    from components.training.preflight import check_dataset

    try:  # the causes in the order to fix them: the URI, the server, the version, then the data
        parse_model_uri(args.model_uri)
        check_tracking(cfg)
        check_version(cfg, args.model_uri)
        check_dataset(cfg.train.data, cfg.curate.s3_endpoint_url)
    except (ModelUriError, ConfigError) as err:
        fail(str(err))
    setup_logging()
    import mlflow

    from components.dataset import IncompleteDatasetError, read_manifest
    from components.evaluation.run import evaluate_version

    try:
        emit(evaluate_version(cfg, args.model_uri, read_manifest(cfg.train.data, cfg.curate.s3_endpoint_url)))
    except (IncompleteDatasetError, ModelUriError) as err:
        fail(str(err))
    except mlflow.exceptions.MlflowException as err:
        fail(f"registry error ({err.error_code}): {str(err.message).splitlines()[0]}")


if __name__ == "__main__":
    main()
