"""The flows as a user runs them: every bad input fails before Ray starts, with one line
and exit status 2; --help and --print-config document themselves; the console
commands and ``python -m flows.X`` work."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from safetensors.torch import save_file

from components.config import load_config
from components.diffusion.sdxl import save_pipeline
from components.diffusion.single_file import export_pipeline
from components.diffusion.tiny import build_tiny
from tests.fixtures.processes import REPO, subprocess_env
from tests.synthetic import write_synthetic_curated

RAY_STARTED = ("Started a local Ray instance", "ray.init", "Starting Ray")


def run(args: list[str], env: dict | None = None, cwd=REPO,
        timeout: float = 120) -> tuple[subprocess.CompletedProcess, float]:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=env or subprocess_env())
    return proc, time.perf_counter() - start


def refused(args: list[str], fragment: str, env: dict | None = None, cwd=REPO) -> str:
    """Exit 2 with one ``error:`` line, no traceback, and no Ray started. How fast is not asserted here (a
    timed test fails on a busy machine, not on a slow flow); the subprocess timeout catches a hang."""
    proc, _ = run(args, env, cwd)
    err_lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert err_lines and err_lines[-1].startswith("error: ") and fragment in err_lines[-1], err_lines[-3:]
    assert "Traceback" not in proc.stderr and not any(mark in proc.stderr for mark in RAY_STARTED)
    return err_lines[-1]


@pytest.fixture(scope="module")
def curated(tmp_path_factory):
    return write_synthetic_curated(tmp_path_factory.mktemp("cli") / "data", n_train=2, n_val=1, size=(64, 64))


@pytest.mark.parametrize(
    ("sets", "fragment"),
    [
        (["train.batch_size=0"], "train.batch_size"),
        (["train.lr.max=-1"], "train.lr.max"),
        (["train.lr.min=1e-2", "train.lr.max=1e-3"], "lr.min 0.01 is above lr.max"),
        (["serve.max_n=0"], "serve.max_n"),
        (["train.optimizer=adamw8bit"], "adamw8bit needs CUDA workers"),
        (["train.use_gpu=true"], "CUDA device"),
        (["model.source=someorg/some-sdxl-model"], "HF_HUB_OFFLINE is set"),
        (["model.source=models:/no-such-model@champion"], "not found in the registry"),
        (["model.source=/nowhere/model.safetensors"], "is not a file"),
        (["model.source=https://example.com/models/sdxl"], "a URL must name a single-file .safetensors"),
    ],
)
def test_bad_training_input_fails_before_ray(sets, fragment, curated, tmp_path):
    env = subprocess_env(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    args = ["flows/train.py", "--set", f"state_dir={tmp_path}", "--set", f"train.data={curated}"]
    refused(args + [x for s in sets for x in ("--set", s)], fragment, env)


def test_an_s3_dataset_without_credentials_is_one_line_before_ray(tmp_path):
    """No AWS credentials anywhere (environment, files, instance metadata): botocore's NoCredentialsError is
    one line naming train.data, not a traceback after Ray started."""
    env = {k: v for k, v in subprocess_env().items() if not k.startswith("AWS_")}
    env.update(AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"), AWS_CONFIG_FILE=str(tmp_path / "none"),
               AWS_EC2_METADATA_DISABLED="true")
    line = refused(["flows/train.py", "--set", f"state_dir={tmp_path}", "--set", "train.data=s3://no-such-bucket/ds/"],
                   "train.data s3://no-such-bucket/ds/", env)
    assert "NoCredentialsError" in line and "Unable to locate credentials" in line


@pytest.fixture(scope="module")
def single_files(tmp_path_factory):
    """An SDXL single file of the tiny preset's model (v-prediction, ZT-SNR markers), its diffusers folder,
    and a safetensors file that is not an SDXL checkpoint."""
    root = tmp_path_factory.mktemp("single")
    cfg = load_config(REPO / "flows/configs/tiny.yaml")
    folder = save_pipeline(build_tiny(cfg.model.tiny), cfg.diffusion, root / "pipe")
    sdxl = export_pipeline(folder, root / "tiny.safetensors", title="t", date="2024-01-01", resolution=(256, 256))
    save_file({"weight": __import__("torch").zeros(2)}, root / "other.safetensors")
    return {"sdxl": sdxl, "folder": folder, "other": root / "other.safetensors"}


@pytest.mark.parametrize(
    ("sets", "fragment"),
    [
        (["model.source={other}"], "is not an SDXL checkpoint in the original layout"),
        (["model.source={sdxl}", "diffusion.prediction_type=epsilon"], "is a v-prediction checkpoint"),
        (["model.source={sdxl}"], "set model.single_file_config to a local diffusers folder"),
        (["model.source={sdxl}", "model.single_file_config=/nowhere"], "is not a diffusers folder"),
    ],
)
def test_a_single_file_source_that_cannot_work_fails_before_ray(sets, fragment, single_files, curated, tmp_path):
    env = subprocess_env(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    args = ["flows/train.py", "--set", f"state_dir={tmp_path}", "--set", f"train.data={curated}"]
    refused(args + [x for s in sets for x in ("--set", s.format(**single_files))], fragment, env)


def test_export_and_publish_refuse_bad_input_in_one_line(tmp_path):
    refused(["flows/export.py", "--set", f"state_dir={tmp_path}", "--model-uri", "models:/terminus-tiny/99"],
            "not found in the registry")
    refused(["flows/export.py", "--set", f"state_dir={tmp_path}", "--model-uri", "terminus-tiny"], "model URI must be")
    refused(["flows/export.py", "--set", f"state_dir={tmp_path}", "--model-uri", "models:/terminus-tiny/1",
             "--out", str(tmp_path / "x.ckpt")], "must end in .safetensors")
    refused(["flows/publish.py", "--set", f"state_dir={tmp_path}", "--model-uri", "models:/terminus-tiny/1"],
            "not found in the registry")


def test_missing_and_unfinished_datasets_have_different_messages(curated, tmp_path):
    missing = refused(["flows/train.py", "--set", f"train.data={tmp_path / 'nowhere'}"], "does not exist")
    (curated.parent / "unfinished").mkdir()
    unfinished = refused(["flows/train.py", "--set", f"train.data={curated.parent / 'unfinished'}"],
                         "curation did not finish")
    assert missing != unfinished


def test_a_refused_yaml_tag_and_a_typo_are_one_line(tmp_path):
    evil = tmp_path / "evil.yaml"
    evil.write_text("train: !!python/object/apply:os.system ['echo pwned']\n")
    refused(["flows/train.py", "--config", str(evil)], "not a valid preset")
    refused(["flows/curate.py", "--set", "curate.workerz=3"], "curate.workerz")


def test_promoting_a_model_that_does_not_exist_is_bad_input(tmp_path):
    refused(["flows/promote.py", "--set", f"state_dir={tmp_path}", "--model", "nope", "--version", "1"],
            "has no version")


def test_help_shows_examples_and_print_config_documents_every_key():
    proc, _ = run(["flows/train.py", "--help"])
    assert proc.returncode == 0 and "examples:" in proc.stdout and "--print-config" in proc.stdout
    proc, _ = run(["-m", "flows.curate", "--print-config", "--set", "curate.workers=5"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "curate.workers = 5  (int)  Curation tasks running at once" in proc.stdout


def test_console_commands_are_installed():
    bindir = REPO / ".venv" / "bin"
    if not (bindir / "terminus-train").exists():
        pytest.skip("the project is not installed in .venv (make setup installs the commands)")
    for name in ("curate", "train", "evaluate", "promote", "plan", "serve", "demo", "bench"):
        proc = subprocess.run([str(bindir / f"terminus-{name}"), "--help"], capture_output=True, text=True,
                              timeout=60, env=subprocess_env())
        assert proc.returncode == 0 and "examples:" in proc.stdout, (name, proc.stderr[-1000:])


def test_flows_run_from_another_folder_find_the_demo_manifest(tmp_path):
    proc, _ = run([str(REPO / "flows/curate.py"), "--print-config"], cwd=tmp_path)
    assert proc.returncode == 0
    assert f'curate.source = "{REPO}/data/demo/manifest.jsonl"' in proc.stdout


def test_the_terminus_curation_dry_run_shows_two_sources_with_their_policies():
    """The card's mixture as a user checks it before any work: LAION-HD's URL parquet with the EXIF,
    watermark and luminance filters, the Midjourney dataset with none; no data read, no Ray."""
    proc, _ = run(["flows/curate.py", "--config", "flows/configs/terminus_v2.yaml", "--dry-run",
                   "--set", "curate.sources.laion-hd.location=s3://elsewhere/laion/"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not any(mark in proc.stderr for mark in RAY_STARTED)
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("laion-hd: urls s3://elsewhere/laion/ ")
    assert "require_exif=True" in lines[0] and "max_watermark=0.7" in lines[0] and "max_luminance=0.5" in lines[0]
    assert lines[1].startswith("mj-general: huggingface hf://datasets/ptx0/mj-general ")
    assert "filters: dedupe=False" in lines[1] and "captions: column 'prompt'" in lines[1]
    sources = json.loads(lines[-1])["sources"]
    assert list(sources) == ["laion-hd", "mj-general"]
    laion, mj = (sources[n]["filters"] for n in sources)
    assert laion != mj and mj["max_watermark"] is None and mj["max_luminance"] is None and not mj["require_exif"]


def test_a_tracking_server_that_does_not_answer_is_the_first_error(tmp_path, curated):
    """MLflow down: one line naming it, before Ray starts and before the data or the version are looked at
    (the MLflow client alone would retry for minutes)."""
    import socket

    with socket.socket() as closed:  # a loopback port nothing listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    env = {**subprocess_env(), "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}"}
    fragment = f"MLflow at http://127.0.0.1:{port} does not answer"
    state = f"state_dir={tmp_path}"
    refused(["flows/train.py", "--set", state, "--set", f"train.data={tmp_path / 'nowhere'}"], fragment, env)
    refused(["flows/evaluate.py", "--set", state, "--model-uri", "models:/nope/1"], fragment, env)
    refused(["flows/promote.py", "--set", state, "--version", "1"], fragment, env)
    refused(["flows/serve.py", "--set", state], fragment, env)


def test_evaluate_names_a_missing_version_before_missing_data(tmp_path):
    refused(["flows/evaluate.py", "--set", f"state_dir={tmp_path}", "--model-uri", "models:/nope/1"],
            "models:/nope/1: not found in the registry")


def test_serve_refuses_a_taken_port_before_ray_starts(tmp_path, registered_model):
    import socket

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        refused(["flows/serve.py", *(x for o in registered_model.overrides for x in ("--set", o)),
                 "--set", f"serve.port={port}"], f"serve.port {port} on 127.0.0.1 is taken")
