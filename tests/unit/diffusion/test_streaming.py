"""Weights written and read one tensor at a time: the single-file export, the half variant and the copy of a
checkpoint's UNet into a model never hold a model whole (components/diffusion/safetensors_stream.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import weakref
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from safetensors.torch import load_file, save_file

from components.config import load_config
from components.diffusion import safetensors_stream as ss
from components.diffusion import single_file as sf
from components.diffusion.sdxl import save_pipeline, save_variant
from components.diffusion.sdxl_base import weight_files
from components.diffusion.tiny import build_tiny
from components.training.checkpointing import IncompleteCheckpointError, copy_into
from tests.fixtures.processes import REPO


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    cfg = load_config(REPO / "flows/configs/tiny.yaml")
    return save_pipeline(build_tiny(cfg.model.tiny), cfg.diffusion, tmp_path_factory.mktemp("stream") / "pipe")


def test_written_file_is_what_safetensors_reads_with_the_hash_of_its_data(tmp_path):
    tensors = {"b": torch.arange(6, dtype=torch.float32).reshape(2, 3), "a": torch.ones(4, dtype=torch.float16),
               "scalar": torch.tensor(2.5), "empty": torch.tensor([]), "ids": torch.arange(5)}
    path = ss.write_tensors(tmp_path / "x.safetensors", [ss.Entry.of(k, v) for k, v in tensors.items()],
                            tensors.items(), {"k": "v"}, hash_key="h")
    back = load_file(path)
    assert set(back) == set(tensors) and all(torch.equal(back[k], v) for k, v in tensors.items())
    meta = ss.metadata(path)
    assert meta["k"] == "v" and meta["h"] == sf.data_sha256(path) != ss.HASH_PLACEHOLDER
    assert {k: torch.equal(v, tensors[k]) for k, v in ss.iter_tensors(path)} == dict.fromkeys(tensors, True)


def test_a_tensor_the_layout_does_not_name_leaves_no_file(tmp_path):
    layout = [ss.Entry("a", "F32", (2,)), ss.Entry("b", "F32", (2,))]
    with pytest.raises(ValueError, match="expected"):
        ss.write_tensors(tmp_path / "x.safetensors", layout, [("a", torch.ones(2)), ("b", torch.ones(3))])
    with pytest.raises(ValueError, match="ended before"):
        ss.write_tensors(tmp_path / "x.safetensors", layout, [("a", torch.ones(2))])
    assert list(tmp_path.iterdir()) == []


def test_writing_and_casting_a_large_file_holds_one_tensor_at_a_time(tmp_path):
    """1.5 GB of fp32 written from a generator, then cast to fp16 file to file: the process's peak RSS grows by
    a small multiple of one 48 MB tensor (its read buffer, its cast), not by the file."""
    script = textwrap.dedent(f"""
        import json, resource, sys, torch
        sys.path.insert(0, {str(REPO)!r})
        from components.diffusion import safetensors_stream as ss
        peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        shape, n = (3072, 4096), 32
        layout = [ss.Entry(f"t{{i}}", "F32", shape) for i in range(n)]
        gen = (("t%d" % i, torch.full(shape, float(i))) for i in range(n))
        torch.full(shape, 0.0); base = peak()
        ss.write_tensors({str(tmp_path / 'big.safetensors')!r}, layout, gen, hash_key="h")
        written = peak()
        ss.copy_cast([__import__("pathlib").Path({str(tmp_path / 'big.safetensors')!r})],
                     {str(tmp_path / 'half.safetensors')!r}, torch.float16)
        print(json.dumps({{"base": base, "written": written, "cast": peak()}}))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True)
    peaks = json.loads(out.stdout.strip().splitlines()[-1])
    tensor = 3072 * 4096 * 4
    assert (tmp_path / "big.safetensors").stat().st_size > 32 * tensor
    assert peaks["written"] - peaks["base"] < 4 * tensor, peaks
    assert peaks["cast"] - peaks["base"] < 6 * tensor, peaks  # read buffer, its cast, allocator
    half = dict(ss.iter_tensors(tmp_path / "half.safetensors"))
    assert half["t7"].dtype == torch.float16 and torch.all(half["t7"] == 7)


def test_single_file_export_keeps_about_one_model_alive(folder, tmp_path, monkeypatch):
    """The export reads the tensors one model at a time: the bytes of read tensors alive at once never exceed
    the largest model, and each model's tensors are let go before the next is read."""
    alive, peak = {"bytes": 0}, {"bytes": 0}
    real = ss.iter_tensors

    def spy(path, dtype=None):
        for key, tensor in real(path, dtype):
            alive["bytes"] += tensor.nbytes
            peak["bytes"] = max(peak["bytes"], alive["bytes"])
            weakref.finalize(tensor, lambda n=tensor.nbytes: alive.__setitem__("bytes", alive["bytes"] - n))
            yield key, tensor

    monkeypatch.setattr(sf, "iter_tensors", spy)
    path = sf.export_pipeline(folder, tmp_path / "x.safetensors", "fp16", title="t", date="2024-05-01T00:00:00Z",
                              resolution=(256, 256))
    per_model = {f.parent.name: sum(ss.Entry(*e.__dict__.values()).nbytes for e in ss.entries(f)) // 2
                 for f in weight_files(folder)}  # fp32 on disk, read as fp16
    assert peak["bytes"] <= max(per_model.values()) < sum(per_model.values())
    assert alive["bytes"] == 0
    assert sf.read_metadata(path)["modelspec.hash_sha256"] == sf.data_sha256(path)


def test_streamed_variant_loads_through_diffusers_as_the_fp32_weights_cast(folder):
    save_variant(folder, "fp16")
    half = StableDiffusionXLPipeline.from_pretrained(str(folder), variant="fp16", dtype=torch.float16)
    full = StableDiffusionXLPipeline.from_pretrained(str(folder), dtype=torch.float32)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        h, f = getattr(half, name).state_dict(), getattr(full, name).state_dict()
        assert set(h) == set(f)
        for key, value in f.items():
            assert torch.equal(h[key], value.to(h[key].dtype)), (name, key)
    assert json.loads((folder / "text_encoder" / "config.json").read_text()).get("dtype") in (None, "float32")


def test_copy_into_refuses_missing_unexpected_and_misshapen_tensors(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.ones(2), "b": torch.ones(3)}, path)
    targets = {"a": torch.zeros(2), "b": torch.zeros(3)}
    copy_into(targets, path)
    assert torch.equal(targets["b"], torch.ones(3))
    with pytest.raises(IncompleteCheckpointError, match="not in the model"):
        copy_into({"a": torch.zeros(2)}, path)
    with pytest.raises(IncompleteCheckpointError, match="lacks 1"):
        copy_into({**targets, "c": torch.zeros(1)}, path)
    with pytest.raises(IncompleteCheckpointError, match=r"is \[3\], the model's \[4\]"):
        copy_into({"a": torch.zeros(2), "b": torch.zeros(4)}, path)
