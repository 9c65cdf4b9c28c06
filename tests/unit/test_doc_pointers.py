"""Every pointer in the docs and the code resolves: file paths, section anchors, ``python -m`` modules and
``make`` targets; docs/architecture.md names every module that exists and none that does not. The docs are
reference: no tracker ids, dated runs or clock times in them (those live in git and in bench/results/)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.fixtures.processes import REPO

ROOTS = ("components", "deploy", "flows", "bench", "tests", "docs", "data")
DOCS = sorted([*(REPO / "docs").glob("*.md"), REPO / "README.md", REPO / "CONTRIBUTING.md"])
CODE = sorted(p for root in ("components", "deploy", "flows", "bench") for p in (REPO / root).rglob("*.py"))
PLACEHOLDER = re.compile(r"[<>*{}$]")
PATH = re.compile(rf"(?<![\w./-])((?:{'|'.join(ROOTS)})/[\w./-]*[\w/])(#[\w-]+)?(?![\w*<{{])")
"""A repository path (a glob such as ``test_faults_*.py`` or a template such as ``bench_<hardware>.json`` is left
out, its folder kept), with its section anchor if any."""
CODE_ROOTS = ("components", "deploy", "flows", "bench", "tests", "docs")
"""In code, ``data/...`` is as often a path inside a user's dataset as the repository's folder."""


HISTORY = {
    "a tracker reference": re.compile(r"\b(?:issues?|items?|tickets?)\s+#?\d+\b|(?<![\w&/#])#\d+\b", re.IGNORECASE),
    "a date": re.compile(r"\b20\d\d-[01]\d-[0-3]\d\b"),
    "a clock time": re.compile(r"\b[0-2]?\d:[0-5]\d(?::[0-5]\d)?\s*(?:UTC|GMT)\b"),
}
"""What marks a story rather than a reference: ``issue 12``, ``items 1 and 2``, ``#12``; ``2026-11-30``;
``20:03 UTC``."""
EXEMPT = re.compile(r"bench/results/[\w./<>*-]+|<!-- results:begin -->.*?<!-- results:end -->", re.DOTALL)
"""Where a date belongs: a results file's name, and the table generated from one (tests/unit/bench)."""


def history(text: str) -> list[str]:
    """Each tracker reference, date or clock time in ``text`` (outside ``EXEMPT``), with its line number."""
    kept = EXEMPT.sub(lambda m: "\n" * m.group().count("\n"), text)
    return [f"line {kept.count(chr(10), 0, m.start()) + 1}: {what} {m.group()!r}"
            for what, pattern in HISTORY.items() for m in pattern.finditer(kept)]


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(doc: Path) -> set[str]:
    return {slug(m) for m in re.findall(r"^#+\s+(.*)$", doc.read_text(), flags=re.MULTILINE)}


def pointers(text: str) -> list[tuple[str, str | None]]:
    found = []
    for path, anchor in PATH.findall(text):
        if not PLACEHOLDER.search(path):
            found.append((path.rstrip("."), anchor[1:] if anchor else None))
    return found


def _check(where: Path, text: str, roots: tuple[str, ...] = ROOTS) -> list[str]:
    bad = []
    for path, anchor in pointers(text):
        if path.split("/")[0] not in roots:
            continue
        target = REPO / path
        if not target.exists():
            bad.append(f"{where.relative_to(REPO)}: {path} does not exist")
        elif anchor and target.suffix == ".md" and anchor not in anchors(target):
            bad.append(f"{where.relative_to(REPO)}: {path}#{anchor} names no section of {path}")
    return bad


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_path_and_section_a_doc_names_exists(doc):
    text = doc.read_text()
    bad = _check(doc, text)
    for link_target, anchor in re.findall(r"\]\(([\w./-]*\.md)?#([\w-]+)\)", text):  # [x](other.md#a), [x](#a)
        target = (doc.parent / link_target) if link_target else doc
        if anchor not in anchors(target):
            bad.append(f"{doc.name}: link to {link_target or doc.name}#{anchor}: no such section")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_a_doc_is_reference_not_history(doc):
    found = history(doc.read_text())
    assert not found, f"{doc.relative_to(REPO)}: history belongs in git or bench/results/:\n" + "\n".join(found)


def test_the_history_check_catches_stories_and_leaves_prose_alone():
    story = "Issue 20 item 3: fixed in #12.\n### Results: 2026-11-30 20:03 UTC\nissues 9 and 18, at 17:41 UTC\n"
    assert history(story) == [
        "line 1: a tracker reference 'Issue 20'", "line 1: a tracker reference 'item 3'",
        "line 1: a tracker reference '#12'", "line 3: a tracker reference 'issues 9'",
        "line 2: a date '2026-11-30'", "line 2: a clock time '20:03 UTC'", "line 3: a clock time '17:41 UTC'"]
    prose = ("Runs are kept as `bench/results/bench_cpu2core_2026-11-30.json`; the item below, 3 issues of the "
             "API, port 8000, RFC 7233, a 16:9 image, `&#123;`, `docs/recipe.md#the-gate`.\n"
             "<!-- results:begin -->\nFrom 2026-11-30T20:03+0000\n<!-- results:end -->\nafter the block\n")
    assert history(prose) == []
    assert history(prose + "issue 7") == ["line 6: a tracker reference 'issue 7'"]


def test_every_path_the_code_names_exists():
    bad = [line for path in CODE for line in _check(path, path.read_text(), CODE_ROOTS)]
    assert not bad, "\n".join(bad)


def test_every_command_the_docs_give_exists():
    makefile = (REPO / "Makefile").read_text()
    targets = set(re.findall(r"^([\w-]+):", makefile, flags=re.MULTILINE))
    bad = []
    for doc in [*DOCS, *CODE]:
        text = doc.read_text()
        for module in re.findall(r"python -m ((?:components|bench|flows|deploy)(?:\.\w+)+)", text):
            rel = Path(*module.split("."))
            if not ((REPO / rel).with_suffix(".py").exists() or (REPO / rel / "__main__.py").exists()):
                bad.append(f"{doc.relative_to(REPO)}: python -m {module}: no such module")
        for target in re.findall(r"`make ([\w-]+)", text):
            if target not in targets:
                bad.append(f"{doc.relative_to(REPO)}: make {target}: no such target")
    assert not bad, "\n".join(bad)


def test_the_architecture_doc_names_every_module_and_only_those():
    doc = (REPO / "docs/architecture.md").read_text()
    modules = sorted(p for root in ("components", "deploy", "bench") for p in (REPO / root).rglob("*.py")
                     if p.name != "__init__.py")
    unnamed = [str(p.relative_to(REPO)) for p in modules
               if str(p.relative_to(REPO)) not in doc and f"`{p.name}`" not in doc and f"`{p.stem}`" not in doc]
    assert not unnamed, f"docs/architecture.md does not name: {unnamed}"
    existing = {p.name for root in ("components", "deploy", "bench", "flows") for p in (REPO / root).rglob("*.py")}
    named = set(re.findall(r"`([\w]+\.py)`", doc))
    assert named <= existing, f"docs/architecture.md names modules that do not exist: {sorted(named - existing)}"


def test_the_pointer_reader_finds_paths_and_anchors_and_skips_globs():
    text = "see `docs/recipe.md#the-gate`, components/nowhere.py and tests/integration/test_faults_*.py."
    assert pointers(text) == [("docs/recipe.md", "the-gate"), ("components/nowhere.py", None),
                              ("tests/integration", None)]  # a glob's folder still has to exist
    assert _check(REPO / "README.md", text) == [
        "README.md: docs/recipe.md#the-gate names no section of docs/recipe.md",
        "README.md: components/nowhere.py does not exist"]
    assert slug("## `make smoke-sdxl`: SDXL at full size".lstrip("# ")) == "make-smoke-sdxl-sdxl-at-full-size"
