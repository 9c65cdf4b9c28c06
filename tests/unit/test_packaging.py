"""Every third-party module the shipped code imports is a declared dependency, pinned for fresh machines.

A module that is only present because someone installed it by hand passes every test on that machine and
fails on a fresh one (CI, a user's clone); this reads the imports from source, not from the environment.
"""
from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SHIPPED = ("components", "deploy", "flows", "bench")
OWN = {"components", "deploy", "flows", "bench", "tests"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(spec: str) -> str:
    return _norm(re.split(r"[\s<>=!~;\[]", spec.strip(), maxsplit=1)[0])


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _declared() -> tuple[set[str], set[str]]:
    project = _pyproject()["project"]
    core = {_requirement_name(s) for s in project["dependencies"]}
    extras = {_requirement_name(s) for specs in project.get("optional-dependencies", {}).values() for s in specs}
    return core, extras


def _imported_modules() -> dict[str, set[str]]:
    """Top-level module -> files of the shipped packages that import it (at any depth, lazily or not)."""
    found: dict[str, set[str]] = {}
    for package in SHIPPED:
        for path in (REPO / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top not in sys.stdlib_module_names and top not in OWN and top != "__future__":
                        found.setdefault(top, set()).add(str(path.relative_to(REPO)))
    return found


def test_every_imported_third_party_module_is_a_declared_dependency():
    core, extras = _declared()
    installed = packages_distributions()  # module -> distributions, read once (it scans every installed one)
    undeclared = {
        module: sorted(files) for module, files in _imported_modules().items()
        if not ({_norm(d) for d in installed.get(module, [])} or {_norm(module)}) & (core | extras)
    }
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"


def test_every_core_dependency_is_pinned_for_a_fresh_machine():
    core, _ = _declared()
    pinned = {_requirement_name(line) for line in (REPO / "constraints.txt").read_text().splitlines()
              if line.strip() and not line.startswith("#")}
    # torch is installed first, by `make setup`, from TORCH_SPEC (the CPU or CUDA build).
    assert core - pinned - {"torch"} == set(), f"not pinned in constraints.txt: {core - pinned}"


def test_the_scan_sees_lazy_imports():
    """The failure this file guards against came from an import inside a function body."""
    modules = _imported_modules()
    assert "torchmetrics" in modules and "components/evaluation/quality.py" in modules["torchmetrics"]
