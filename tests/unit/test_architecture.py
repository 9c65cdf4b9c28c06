"""The import rules of docs/architecture.md, read from the source (an AST walk, every import counted,
lazy ones inside functions included), so that the layering stays true as code is added."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.processes import REPO

ROOTS = ("components", "deploy", "bench", "flows")
LAYERS: list[tuple[str, ...]] = [
    ("components.environment", "components.config", "components.cluster", "components.host_memory",
     "components.http_fetch"),
    ("components.redact",),
    ("components.storage",),
    ("components.dataset", "components.diffusion"),
    ("components.registry",),
    ("components.training", "components.curation"),
    ("components.evaluation", "deploy"),
    ("bench",),
    ("flows",),
]
"""Lowest first. A module may import from a lower layer, or from its own group (the entry it falls
under); never from a higher layer, and never from another group of its own layer."""
EDGE_ONLY = {
    "ray.train": ("components.training.driver", "components.training.loop", "bench"),
    "ray.serve": ("deploy", "bench"),
}
"""Third-party packages that only these modules (or packages) may import: Ray Train at the training
edge, Ray Serve in deploy/ (and the benchmarks, which measure exactly those)."""


def module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    if parts[0] == "flows" and len(parts) == 2:  # flows import each other as top-level scripts
        return "flows." + parts[1]
    return ".".join(parts)


def project_files() -> list[Path]:
    return sorted(p for root in ROOTS for p in (REPO / root).rglob("*.py"))


PACKAGES = {"components", "deploy", "bench", "flows"}


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    """ids of the import nodes under ``if TYPE_CHECKING:`` (annotations only; they never run)."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return skip


def imports_of(path: Path, known: set[str], runtime_only: bool = False) -> set[str]:
    """Every module ``path`` imports (absolute names; ``from a import b`` counts ``a.b`` when that is a
    module of ours). Imports inside functions count; ``if TYPE_CHECKING:`` ones unless ``runtime_only``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    skip = _type_checking_nodes(tree) if runtime_only else set()
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            module = "flows._common" if node.module == "_common" else node.module  # flows import it by path
            found.add(module)
            found.update(f"{module}.{a.name}" for a in node.names if f"{module}.{a.name}" in known)
    return found - PACKAGES


def import_graph(runtime_only: bool = False) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(our modules -> the modules of ours each imports, our modules -> every name each imports)."""
    files = project_files()
    known = {module_name(p) for p in files}
    raw = {module_name(p): imports_of(p, known, runtime_only) for p in files}
    graph = {name: {m for m in names if m in known and m != name} for name, names in raw.items()}
    return graph, raw


def group_of(module: str) -> tuple[int, str]:
    for level, groups in enumerate(LAYERS):
        for group in groups:
            if module == group or module.startswith(group + "."):
                return level, group
    raise AssertionError(f"{module} is in no layer: add it to LAYERS and docs/architecture.md")


def layering_violations(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for module, deps in graph.items():
        if module in PACKAGES:
            continue  # a package marker, no code
        level, group = group_of(module)
        for dep in deps:
            dep_level, dep_group = group_of(dep)
            if dep_group != group and dep_level >= level:
                bad.append(f"{module} (layer {level}) imports {dep} (layer {dep_level})")
    return sorted(bad)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in list(graph):
        if v not in index:
            visit(v)
    return out


def closure(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(graph.get(m, ()))
    return seen


def test_no_upward_or_sideways_import():
    graph, _ = import_graph()
    assert layering_violations(graph) == []


def test_no_import_cycle():
    graph, _ = import_graph()
    assert cycles(graph) == []


def test_ray_train_and_ray_serve_stay_at_their_edges():
    _, raw = import_graph()
    bad = []
    for module, names in raw.items():
        for package, allowed in EDGE_ONLY.items():
            if any(n == package or n.startswith(package + ".") for n in names):
                if not any(module == a or module.startswith(a + ".") for a in allowed):
                    bad.append(f"{module} imports {package}")
    assert bad == []


def test_no_component_imports_deploy_or_bench():
    _, raw = import_graph()
    bad = [(m, n) for m, names in raw.items() if m.startswith("components")
           for n in names if n.split(".")[0] in ("deploy", "bench")]
    assert bad == []


def test_a_registered_model_needs_only_the_diffusion_package():
    graph, _ = import_graph(runtime_only=True)
    needed = closure(graph, "components.diffusion.pyfunc")
    assert {m for m in needed if not m.startswith("components.diffusion")} == set()


def test_the_checker_sees_violations():
    """The rules above on a graph with one upward import and one cycle: both are reported."""
    graph = {"components.storage": {"components.registry.model"}, "components.registry.model": {"components.storage"},
             "components.training.loop": {"components.curation.pipeline"}, "components.curation.pipeline": set()}
    assert "components.storage (layer 2) imports components.registry.model (layer 4)" in layering_violations(graph)
    assert ("components.training.loop (layer 5) imports components.curation.pipeline (layer 5)"
            in layering_violations(graph))
    assert cycles(graph) == [["components.registry.model", "components.storage"]]


@pytest.mark.parametrize("module", ["components.diffusion.request", "deploy.api"])
def test_request_types_and_the_http_contract_load_without_torch(module):
    code = f"import sys, {module}; bad = [m for m in ('torch', 'diffusers') if m in sys.modules]; print(bad)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
