"""Export a registered version as one single-file .safetensors for ComfyUI, A1111 and Forge.

A full model: the UNet, both text encoders and the VAE in the original SDXL key layout, the v_pred and
ztsnr marker keys, and ModelSpec metadata. An adapter version (LoRA, LoKr): the adapter in kohya's key layout,
with sd-scripts' ss_* keys (rank, alpha), ModelSpec's keys and its base's URI and hash (docs/adapters.md).
Either is logged with the version's training run and named by the version's single_file.* tags
(docs/interchange.md).

examples:
  python flows/export.py --model-uri models:/terminus-tiny@champion
  python flows/export.py --model-uri models:/terminus-tiny/3 --precision bf16 --out /tmp/terminus.safetensors

Exit codes: 0 exported (last stdout line: JSON), 1 the export failed, 2 bad input (no such version, a model
that cannot be written as a single file).
"""

from __future__ import annotations

import sys

from flows._common import banner, emit, fail, load, parser, setup_logging


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--model-uri", required=True, help="models:/NAME/VERSION or models:/NAME@ALIAS")
    p.add_argument("--out", help="the .safetensors to write (default: <state>/exports/single_file/NAME-vN-PRECISION"
                                 ".safetensors)")
    p.add_argument("--precision", choices=("fp16", "bf16", "fp32"), default="fp16",
                   help="weight precision of the file (default fp16; the UIs load fp16 and bf16)")
    p.add_argument("--title", help="modelspec.title (default: NAME vN)")
    p.add_argument("--no-log", action="store_true", help="do not log the file to MLflow or tag the version")
    args = p.parse_args()
    cfg = load(args)
    if args.out and not args.out.endswith(".safetensors"):
        fail(f"--out {args.out}: the file name must end in .safetensors")
    # after parsing: --help and a refused command line load no Ray, MLflow or torch
    from components.registry.model import ModelUriError, check_version

    try:
        check_version(cfg, args.model_uri)
    except ModelUriError as err:
        fail(str(err))
    setup_logging()
    import mlflow

    from components.diffusion.adapters import AdapterError
    from components.diffusion.single_file import SingleFileExportError
    from components.registry.export import export_version

    banner(f"export {args.model_uri} as one {args.precision} .safetensors")
    try:
        result = export_version(cfg, args.model_uri, args.out, args.precision, args.title, log=not args.no_log)
    except (ModelUriError, SingleFileExportError, AdapterError) as err:
        fail(str(err))
    except mlflow.exceptions.MlflowException as err:
        fail(f"registry error ({err.error_code}): {str(err.message).splitlines()[0]}")
    except OSError as err:
        fail(f"export failed: {err}", code=1)
    print(f"wrote {result['path']} ({result['keys']} tensors, {result['bytes'] / 2**20:.1f} MiB)", file=sys.stderr)
    emit(result)


if __name__ == "__main__":
    main()
