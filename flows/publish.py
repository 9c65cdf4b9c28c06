"""Write a registered version as a Hub-ready folder with a filled-in model card; push it with --push.

The folder: the diffusers weights (fp32 and the half-precision variant), the single-file checkpoint for
ComfyUI/A1111/Forge, validation images, and README.md with the Hub's YAML block and every section filled
from MLflow (docs/interchange.md). --push uploads it with huggingface_hub when a token is configured
(HF_TOKEN, or `hf auth login`).

examples:
  python flows/publish.py --model-uri models:/terminus-tiny@champion
  python flows/publish.py --model-uri models:/terminus-tiny/3 --out /tmp/terminus-v3
  HF_TOKEN=... python flows/publish.py --model-uri models:/terminus-tiny@champion --push --repo-id me/terminus-tiny

Exit codes: 0 written (and pushed; last stdout line: JSON), 1 the push failed, 2 bad input (no such version, a
version never evaluated, no token for --push).
"""

from __future__ import annotations

import os
import sys

from flows._common import banner, emit, fail, load, parser, setup_logging


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--model-uri", required=True, help="models:/NAME/VERSION or models:/NAME@ALIAS")
    p.add_argument("--out", help="the folder to write (default: <state>/publish/NAME-vN; replaced if it exists)")
    p.add_argument("--push", action="store_true", help="upload the folder to the Hub (needs a token)")
    p.add_argument("--repo-id", help="Hub repository for --push (default: publish.repo_id)")
    args = p.parse_args()
    hub_offline_before = os.environ.get("HF_HUB_OFFLINE")
    cfg = load(args)
    repo_id = args.repo_id or cfg.publish.repo_id
    token = None
    if args.push:
        if not repo_id:
            fail("--push needs --repo-id ORG/NAME (or publish.repo_id)")
        if hub_offline_before not in (None, "", "0"):
            fail("--push with HF_HUB_OFFLINE set: unset it where the Hub is reachable")
        os.environ.pop("HF_HUB_OFFLINE", None)  # set by load() for the tiny model; the push needs the Hub
        # after parsing: --help and a refused command line load no Ray, MLflow or torch
        from huggingface_hub import get_token

        token = get_token()
        if not token:
            fail("--push needs a Hugging Face access token (the HF_TOKEN variable, or `hf auth login`)")
    from components.registry.model import ModelUriError, check_version

    try:
        check_version(cfg, args.model_uri)
    except ModelUriError as err:
        fail(str(err))
    setup_logging()
    import mlflow

    from components.diffusion.single_file import SingleFileExportError
    from components.registry.card import CardError, push_folder, write_folder

    banner(f"publish {args.model_uri}")
    try:
        result = write_folder(cfg, args.model_uri, args.out, repo_id)
    except (ModelUriError, CardError, SingleFileExportError) as err:
        fail(str(err))
    except mlflow.exceptions.MlflowException as err:
        fail(f"registry error ({err.error_code}): {str(err.message).splitlines()[0]}")
    result["pushed"] = None
    if args.push:
        from huggingface_hub.errors import HfHubHTTPError

        banner(f"push {result['folder']} to {repo_id}")
        try:
            result["pushed"] = push_folder(result["folder"], repo_id, token, cfg.publish.private)
        except (HfHubHTTPError, OSError, ValueError) as err:
            fail(f"push to {repo_id} failed: {str(err).strip().splitlines()[0] if str(err).strip() else err}", code=1)
    print(f"wrote {result['folder']} ({len(result['files'])} files)", file=sys.stderr)
    emit(result)


if __name__ == "__main__":
    main()
