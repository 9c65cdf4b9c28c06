"""Load an exported single-file checkpoint with vanilla diffusers and check every tensor against its source.

    python -m bench.single_file_check --config PRESET --file X.safetensors --model-uri models:/NAME/V [--json OUT]

The file goes through ``StableDiffusionXLPipeline.from_single_file`` with the registered version's folder as
its configs (offline). Each component of the result is compared with the same component read from that
version's folder by ``from_pretrained`` in the file's precision (cast as it loads), one component at a time so
that one SDXL copy and one component are in memory, not two pipelines: the key sets (missing, unexpected) and
every tensor (``torch.equal``). The last stdout line is the JSON that ``--json`` also writes.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from components.config import load_config
from components.diffusion.schedule import inference_scheduler
from components.diffusion.single_file import DTYPES, read_keys, read_metadata
from components.registry.model import fetch_model
from components.registry.tracking import setup_tracking

LOADERS = {"unet": UNet2DConditionModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel,
           "text_encoder_2": CLIPTextModelWithProjection}


def file_precision(path: Path) -> str:
    """The precision of a single file's floating tensors (the schedule markers aside)."""
    names = {"F16": "fp16", "BF16": "bf16", "F32": "fp32"}
    found = {names[dtype] for dtype, shape in read_keys(path).values() if dtype in names and math.prod(shape) > 0}
    if len(found) != 1:
        raise ValueError(f"{path}: floating tensors in {sorted(found)}, not one precision")
    return found.pop()


def compare(loaded: torch.nn.Module, source: torch.nn.Module) -> dict:
    got, want = loaded.state_dict(), source.state_dict()
    equal = sum(1 for k in want if k in got and got[k].shape == want[k].shape and torch.equal(got[k], want[k]))
    return {"tensors": len(want), "equal": equal, "missing": sorted(set(want) - set(got)),
            "unexpected": sorted(set(got) - set(want))}


def check(path: Path, pipeline_dir: Path, diffusion) -> dict:
    precision = file_precision(path)
    dtype = DTYPES[precision]
    t0 = time.perf_counter()
    pipe = StableDiffusionXLPipeline.from_single_file(
        str(path), config=str(pipeline_dir), scheduler=inference_scheduler(diffusion), dtype=dtype,
        local_files_only=True)
    load_s = time.perf_counter() - t0
    components = {}
    for name, cls in LOADERS.items():
        source = cls.from_pretrained(str(pipeline_dir), subfolder=name, dtype=dtype, use_safetensors=True)
        components[name] = compare(getattr(pipe, name), source)
        del source
    return {
        "file": str(path), "precision": precision, "file_tensors": len(read_keys(path)),
        "modelspec_title": read_metadata(path).get("modelspec.title"), "load_s": round(load_s, 1),
        "tensors": sum(c["tensors"] for c in components.values()),
        "equal": sum(c["equal"] for c in components.values()),
        "missing": sum(len(c["missing"]) for c in components.values()),
        "unexpected": sum(len(c["unexpected"]) for c in components.values()),
        "components": {k: {**v, "missing": v["missing"][:10], "unexpected": v["unexpected"][:10]}
                       for k, v in components.items()},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="the preset the version was trained with")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--file", required=True, help="the exported .safetensors")
    p.add_argument("--model-uri", required=True, help="the registered version it was exported from")
    p.add_argument("--json", help="also write the result here")
    args = p.parse_args()
    cfg = load_config(args.config, args.overrides)
    setup_tracking(cfg)
    pipeline_dir = fetch_model(args.model_uri, cfg.state_path("cache", "models")).pipeline_dir
    result = {"model_uri": args.model_uri, **check(Path(args.file), pipeline_dir, cfg.diffusion)}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    print(f"{result['equal']} of {result['tensors']} tensors equal; missing {result['missing']}, unexpected "
          f"{result['unexpected']}", file=sys.stderr)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
