"""The results files of ``make bench`` and the table docs/benchmarks.md shows from the newest of them."""

from __future__ import annotations

import json
import re

import pytest

from bench import report as rep

FIGURES = [
    {"section": "curation", "name": "single-process PIL loop", "value": 14.5, "unit": "img/s", "target": None,
     "anchor": "", "claim": False, "status": "-"},
    {"section": "curation", "name": "pipeline / loop", "value": 1.91, "unit": "x", "target": [">=", 1.8],
     "anchor": "ideal 2x on 2 CPUs", "claim": False, "status": "PASS"},
    {"section": "serving", "name": "Serve overhead, paired per request", "value": 16.9, "unit": "ms",
     "target": ["<=", 5.0], "anchor": "immune to load drift", "claim": False, "status": "MISS"},
    {"section": "training", "name": "noise: plain loop after / before the Ray run", "value": 4.7, "unit": "%",
     "target": None, "anchor": "same work: ideally 0", "claim": False, "status": "-"},
    {"section": "zt_repro", "name": "ZT spread / default spread", "value": 1.75, "unit": "x", "target": [">", 1.0],
     "anchor": "Lin et al. 2023, sec. 3", "claim": True},  # no status: computed from value and target
]


def _report(date: str, commit: str = "0123456789abcdef0123", sections=rep.SECTIONS, figures=FIGURES) -> dict:
    return {"hardware": "cpu2core",
            "meta": {"date": date, "cpu": "Test CPU", "cores": 2, "git_commit": commit, "total_s": 461.4,
                     "load_start": [1.0, 1.1, 1.2], "load_end": [1.3, 1.2, 1.1], "config": "tiny"},
            "sections": {name: {"wall_s": 10.0, "load_before": [1.0, 1.0, 1.0], "load_after": [1.5, 1.0, 1.0]}
                         for name in sections},
            "figures": figures, "missed": []}


@pytest.fixture
def results(tmp_path):
    folder = tmp_path / "results"
    folder.mkdir()
    rep.write_report(None, _report("2026-12-01T09:00:00+0000", commit="aaaaaaa"), folder)
    newest = rep.write_report(None, _report("2026-12-03T10:15:00+0000"), folder)
    rep.write_report(None, _report("2026-12-09T08:00:00+0000", sections=("serving",)), folder)  # --only: not a full run
    return folder, newest


def test_the_docs_table_is_the_one_the_newest_committed_results_file_renders():
    newest = rep.newest_results()
    assert newest is not None, "bench/results/ holds no bench_*.json"
    assert rep.render_docs() == rep.DOC.read_text(), (
        f"docs/benchmarks.md's results table is not what {newest.name} renders: "
        "run python -m bench.report --render-docs")


def test_every_committed_run_has_its_rendered_md_beside_it():
    for path in sorted(rep.RESULTS.glob("bench*.json")):
        assert path.with_suffix(".md").read_text() == rep.render_markdown(json.loads(path.read_text()), path.name), (
            f"{path.with_suffix('.md').name} is not its JSON rendered: python -m bench.report --render-md {path}")


def test_results_files_are_named_theme_hardware_date():
    name = re.compile(r"[a-z0-9_-]+_[a-z0-9]+_20\d\d-[01]\d-[0-3]\d(_[a-z0-9]+)?\.(json|md)")
    for path in rep.RESULTS.iterdir():
        assert name.fullmatch(path.name), path.name


def test_a_run_is_written_as_json_and_md_named_by_hardware_and_date(results):
    folder, newest = results
    assert sorted(p.name for p in folder.iterdir()) == [
        "bench-serving_cpu2core_2026-12-09.json", "bench-serving_cpu2core_2026-12-09.md",
        "bench_cpu2core_2026-12-01.json", "bench_cpu2core_2026-12-01.md",
        "bench_cpu2core_2026-12-03.json", "bench_cpu2core_2026-12-03.md"]
    again = rep.write_report(None, _report("2026-12-03T18:00:00+0000"), folder)
    assert again.name == "bench_cpu2core_2026-12-03_2.json"  # the day's first run is kept
    assert json.loads(newest.read_text())["meta"]["git_commit"] == "0123456789abcdef0123"
    md = newest.with_suffix(".md").read_text()
    assert "| curation | pipeline / loop | 1.91 x | >= 1.8 x | ideal 2x on 2 CPUs | PASS |" in md
    assert "| curation | single-process PIL loop | 14.5 img/s | - | - | - |" in md  # every figure in the .md


def test_the_table_shows_the_newest_full_run_with_each_target_and_verdict(results, tmp_path):
    folder, newest = results
    assert rep.newest_results(folder) == newest
    doc = tmp_path / "benchmarks.md"
    doc.write_text(f"# Benchmarks\n\nbefore\n\n{rep.DOC_BEGIN}\nstale table\n{rep.DOC_END}\n\nafter\n")
    text = rep.render_docs(doc, folder)
    assert text.startswith("# Benchmarks\n\nbefore\n\n") and text.endswith(f"{rep.DOC_END}\n\nafter\n")
    assert "stale table" not in text
    block = text.split(rep.DOC_BEGIN)[1].split(rep.DOC_END)[0]
    assert newest.name in block and "2026-12-03T10:15:00+0000" in block and "cpu2core" in block
    assert "commit 0123456789ab," in block and "461 s" in block
    assert "2026-12-01" not in block and "aaaaaaa" not in block and "2026-12-09" not in block
    assert "| curation | pipeline / loop | 1.91 x | >= 1.8 x | ideal 2x on 2 CPUs | PASS |" in block
    assert "| serving | Serve overhead, paired per request | 16.9 ms | <= 5 ms | immune to load drift | MISS |" in block
    assert "| zt_repro | ZT spread / default spread | 1.75 x | > 1 x | Lin et al. 2023, sec. 3 | HOLDS |" in block
    assert "| training | noise: plain loop after / before the Ray run | 4.7 % | - | same work: ideally 0 | - |" in block
    assert "single-process PIL loop" not in block  # no target, no anchor: in the .md only
    doc.write_text(text)
    assert rep.render_docs(doc, folder) == text  # rendering again changes nothing


def test_a_transcribed_run_says_so_and_a_missing_field_reads_as_not_recorded(tmp_path):
    path = tmp_path / "bench_cpu2core_2026-11-30.json"
    path.write_text(json.dumps({"hardware": "cpu2core", "source": "transcribed from docs/benchmarks.md at abc1234",
                                "meta": {"date": "2026-11-30T20:03+0000", "cores": 2, "git_commit": "75e5d71",
                                         "total_s": None},
                                "sections": {}, "figures": FIGURES[1:2]}))
    block = rep.docs_table(path)
    assert "Source: transcribed from docs/benchmarks.md at abc1234." in block
    assert "commit 75e5d71, total time not recorded" in block


def test_a_doc_without_its_markers_is_refused(tmp_path, results):
    doc = tmp_path / "doc.md"
    doc.write_text("# no markers\n")
    with pytest.raises(ValueError, match="results:begin"):
        rep.render_docs(doc, results[0])


@pytest.mark.parametrize(("name", "count", "expected"), [
    ("NVIDIA H100 80GB HBM3", 1, "h100"), ("NVIDIA A100-SXM4-80GB", 8, "a100x8"),
    ("NVIDIA GeForce RTX 4090", 1, "rtx4090"), ("NVIDIA L40S", 2, "l40sx2"),
])
def test_hardware_names_the_gpu_model(monkeypatch, name, count, expected):
    monkeypatch.setattr(rep.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(rep.torch.cuda, "get_device_name", lambda index=0: name)
    monkeypatch.setattr(rep.torch.cuda, "device_count", lambda: count)
    assert rep.hardware() == expected


def test_hardware_without_a_gpu_is_the_cpu_count(monkeypatch):
    monkeypatch.setattr(rep.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(rep.os, "cpu_count", lambda: 2)
    assert rep.hardware() == "cpu2core"
