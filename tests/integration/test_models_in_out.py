"""Models in and out, on a model trained as the demo trains it (``trained_champion``): its
single-file export loads in vanilla diffusers and matches the registered folder; a fine-tune continues
from ``@champion`` and names its parent; the Hub-ready folder is written and pushed to a Hub stub."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from safetensors.torch import load_file

from components.diffusion import single_file as sf
from components.diffusion.schedule import inference_scheduler
from components.diffusion.sources import weights_sha256
from components.diffusion.tiny import build_tiny
from components.registry.model import fetch_model, local_folder
from tests.fixtures.hub import HubStub
from tests.fixtures.processes import REPO, subprocess_env
from tests.unit.diffusion.test_single_file import outputs

pytestmark = pytest.mark.slow


def flow(script: str, overrides: list[str], *args: str, env: dict | None = None, timeout: int = 900):
    """Run ``flows/<script>`` as a user does; (exit code, last-line JSON or None, stderr)."""
    cmd = [sys.executable, f"flows/{script}", "--config", "flows/configs/tiny.yaml"]
    for o in overrides:
        cmd += ["--set", o]
    proc = subprocess.run([*cmd, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env=env or subprocess_env())
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    out = json.loads(lines[-1]) if proc.returncode == 0 and lines else None
    return proc.returncode, out, proc.stderr


def client_for(t) -> mlflow.MlflowClient:
    store = t.cfg.tracking.tracking_uri
    return mlflow.MlflowClient(tracking_uri=store, registry_uri=store)


def test_the_champion_exports_to_a_single_file_vanilla_diffusers_loads(trained_champion, tmp_path):
    """``flows/export.py`` on ``@champion``: one fp16 file with ``v_pred`` and ``ztsnr`` that
    ``from_single_file`` loads (configs from the registered folder, the preset's scheduler) into models
    whose outputs are the registered folder's within fp16 rounding; the file is logged with the version's
    run and named by its tags."""
    t = trained_champion
    code, out, err = flow("export.py", t.overrides, "--model-uri", f"models:/{t.name}@champion",
                          "--out", str(tmp_path / "champion.safetensors"))
    assert code == 0, err[-3000:]
    assert out["version"] == t.version and out["precision"] == "fp16" and out["keys"] == len(load_file(out["path"]))
    state = load_file(out["path"])
    assert sf.V_PRED_KEY in state and sf.ZTSNR_KEY in state
    assert sf.read_metadata(out["path"])["modelspec.hash_sha256"] == out["hash_sha256"] == sf.data_sha256(out["path"])

    folder = fetch_model(t.uri, t.cfg.state_path("cache", "models")).pipeline_dir
    loaded = StableDiffusionXLPipeline.from_single_file(
        out["path"], config=str(folder), scheduler=inference_scheduler(t.cfg.diffusion), dtype=torch.float32,
        local_files_only=True)
    registered = StableDiffusionXLPipeline.from_pretrained(str(folder), dtype=torch.float32)
    trained_unet = registered.unet.state_dict()
    initial_unet = build_tiny(t.cfg.model.tiny).unet.state_dict()
    assert any(not torch.equal(trained_unet[k], initial_unet[k]) for k in trained_unet)  # a trained model
    expected, got = outputs(registered), outputs(loaded)
    for key in expected:
        error = (expected[key] - got[key]).abs().max().item()
        assert 0 < error <= 16 * 2.0**-11 * expected[key].abs().max().item(), key

    version = client_for(t).get_model_version(t.name, t.version)
    assert version.tags["single_file.fp16"] == f"runs:/{t.run_id}/single_file/champion.safetensors"
    assert version.tags["single_file.fp16.sha256"] == out["hash_sha256"]
    logged = client_for(t).download_artifacts(t.run_id, "single_file/champion.safetensors", str(tmp_path / "dl"))
    assert Path(logged).read_bytes() == Path(out["path"]).read_bytes()
    # A local artifact store on the same file system: the export and the logged copy are one file on disk.
    stored = local_folder(client_for(t).get_run(t.run_id).info.artifact_uri) / "single_file/champion.safetensors"
    assert out["shared_with_artifact"] and os.path.samefile(stored, out["path"])


def test_the_registered_folder_has_an_fp16_variant_next_to_the_fp32_weights(trained_champion):
    """diffusers' ``variant="fp16"`` loads the same weights in half precision from the registered folder."""
    t = trained_champion
    folder = fetch_model(t.uri, t.cfg.state_path("cache", "models")).pipeline_dir
    full = StableDiffusionXLPipeline.from_pretrained(str(folder), dtype=torch.float32)
    half = StableDiffusionXLPipeline.from_pretrained(str(folder), variant="fp16", dtype=torch.float16)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        a, b = full.components[name].state_dict(), half.components[name].state_dict()
        assert all(torch.equal(a[k].half(), b[k]) for k in a), name
    assert (folder / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    tags = client_for(t).get_model_version(t.name, t.version).tags
    assert tags["weight_variant"] == "fp16"
    assert int(tags["size.fp16_bytes"]) < 0.55 * int(tags["size.fp32_bytes"])


def test_training_continues_from_the_champion_and_names_its_parent(trained_champion, tmp_path):
    """``flows/train.py --set model.source=models:/terminus-tiny@champion``: the run's lineage names the
    parent version (the alias resolved to a number), its run and the hash of its weights, and the new
    version starts from the champion's weights (a few small steps away from them, far from the
    tiny model's initial ones)."""
    t = trained_champion
    sets = [*t.overrides, f"model.source=models:/{t.name}@champion", "train.run_name=child", "train.max_steps=2",
            "train.lr.max=1e-6", "train.lr.min=1e-7"]
    code, out, err = flow("train.py", sets)
    assert code == 0, err[-3000:]
    client = client_for(t)
    run = client.get_run(out["run_id"])
    lineage = {k.removeprefix("lineage."): v for k, v in run.data.tags.items() if k.startswith("lineage.")}
    champion_dir = fetch_model(t.uri, t.cfg.state_path("cache", "models")).pipeline_dir
    assert lineage["source"] == f"models:/{t.name}@champion" and lineage["kind"] == "registered"
    assert lineage["parent_model"] == t.name and lineage["parent_version"] == t.version == lineage["revision"]
    assert lineage["parent_run_id"] == t.run_id
    assert lineage["weights_sha256"] == weights_sha256(champion_dir)
    assert json.loads(lineage["pinned"])["source"] == f"models:/{t.name}/{t.version}"
    child = client.get_model_version(t.name, out["version"])
    assert child.tags["lineage.parent_version"] == t.version
    assert child.tags["base_model"] == f"models:/{t.name}@champion"

    child_dir = fetch_model(f"models:/{t.name}/{out['version']}", t.cfg.state_path("cache", "models")).pipeline_dir
    child_unet = load_file(child_dir / "unet" / "diffusion_pytorch_model.safetensors")
    parent_unet = load_file(champion_dir / "unet" / "diffusion_pytorch_model.safetensors")
    initial = {k: v.contiguous() for k, v in build_tiny(t.cfg.model.tiny).unet.state_dict().items()}

    def distance(a, b):
        return sum((a[k].float() - b[k].float()).pow(2).sum().item() for k in a) ** 0.5

    assert distance(child_unet, parent_unet) < 0.1 * distance(child_unet, initial)


def test_publish_writes_a_hub_folder_and_pushes_it_to_a_hub_stub(trained_champion, tmp_path):
    """``flows/publish.py --push`` against a stub of the Hub's HTTP API on 127.0.0.1 (git LFS protocol):
    the repository is created and one commit holds every file of the folder, byte for byte; the folder
    is a diffusers repository (``from_pretrained`` on it, fp32 and the fp16 variant) with the single file
    and the card."""
    t = trained_champion
    folder = tmp_path / "hub"
    with HubStub() as hub:
        env = subprocess_env(HF_ENDPOINT=hub.url, HF_TOKEN="hf_stub_token", HF_HUB_DISABLE_XET="1",
                             HF_HOME=str(tmp_path / "hf-home"))
        env.pop("HF_HUB_OFFLINE", None)
        code, out, err = flow("publish.py", t.overrides, "--model-uri", f"models:/{t.name}@champion", "--out",
                              str(folder), "--push", "--repo-id", "terminus-test/tiny", env=env)
        assert code == 0, err[-3000:]
        state = hub.state
    assert out["pushed"].startswith(f"{hub.url}/terminus-test/tiny/commit/")
    assert list(state.repos) == ["terminus-test/tiny"] and state.tokens == {"hf_stub_token"}
    assert state.validated and all(v["pipeline_tag"] == "text-to-image" for v in state.validated)  # the card's
    assert len(state.commits) == 1
    local = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    assert set(state.files["terminus-test/tiny"]) == set(local) == set(out["files"])
    for path, content in local.items():
        pushed = state.files["terminus-test/tiny"][path]
        assert hashlib.sha256(pushed).digest() == hashlib.sha256(content).digest(), path
    lfs = {op["value"]["path"] for op in state.commits[0]["ops"] if op["key"] == "lfsFile"}
    assert f"{t.name}-v{t.version}.safetensors" in lfs and "unet/diffusion_pytorch_model.safetensors" in lfs

    for name in ("model_index.json", "README.md", f"{t.name}-v{t.version}.safetensors", "images/probe_grid.png",
                 "unet/diffusion_pytorch_model.fp16.safetensors", "scheduler/scheduler_config.json"):
        assert (folder / name).is_file(), name
    StableDiffusionXLPipeline.from_pretrained(str(folder), variant="fp16", dtype=torch.float16)
    assert sf.V_PRED_KEY in sf.read_keys(folder / f"{t.name}-v{t.version}.safetensors")


def test_push_without_a_token_is_a_one_line_refusal(tmp_path):
    """Refused before the registry is read: no version is needed to see it."""
    env = subprocess_env(HF_HOME=str(tmp_path / "hf-home"))
    for key in ("HF_TOKEN", "HF_HUB_OFFLINE", "HUGGING_FACE_HUB_TOKEN"):
        env.pop(key, None)
    sets = [f"state_dir={tmp_path / 'state'}"]
    code, out, err = flow("publish.py", sets, "--model-uri", "models:/terminus-tiny@champion", "--push",
                          "--repo-id", "terminus-test/tiny", env=env)
    assert code == 2 and out is None
    assert err.strip().splitlines()[-1] == \
        "error: --push needs a Hugging Face access token (the HF_TOKEN variable, or `hf auth login`)"
