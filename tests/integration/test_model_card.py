"""The model card of a model trained as the demo trains it, read back: the YAML header parses
with the Hub's fields, no section is empty or says "More Information Needed", and every number in it
equals the figure MLflow holds -- looked up here independently of the card code, and tied to the
things themselves where they can be measured (parameter counts, file sizes, curation counts)."""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

import mlflow
import pytest
import torch
import yaml
from diffusers import StableDiffusionXLPipeline
from huggingface_hub import ModelCard

from components.registry.card import (
    PLACEHOLDER,
    PLACEHOLDERS,
    fmt_bytes,
    fmt_float,
    fmt_hours,
    fmt_int,
    fmt_mb,
    fmt_seconds,
    fmt_time,
    write_folder,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def card(trained_champion, tmp_path_factory):
    t = trained_champion
    folder = tmp_path_factory.mktemp("card") / "hub"
    result = write_folder(t.cfg, f"models:/{t.name}@champion", folder, repo_id="terminus-test/tiny")
    return folder, (folder / "README.md").read_text(), result


def unlinked(text: str) -> str:
    """Markdown links with their targets dropped: a URL's digits are an address, not a figure."""
    return re.sub(r"\]\([^)]*\)", "]", text)


def split_card(text: str) -> tuple[dict, str]:
    m = re.match(r"^---\n(.*?)\n---\n", text, re.S)
    assert m, "no YAML block at the top"
    return yaml.safe_load(m[1]), text[m.end():]


def table_rows(body: str) -> list[tuple[str, str]]:
    rows = []
    for line in body.splitlines():
        if line.startswith("| ") and not line.startswith("| |"):
            label, value = (c.strip() for c in line.strip().strip("|").split(" | ", 1))
            rows.append((label, value.replace("\\|", "|")))
    return rows


def expected_figures(t, scratch: Path) -> dict[str, str]:
    """Every card row that states a number, as MLflow holds it (queried here, formatted as the card does)."""
    store = t.cfg.tracking.tracking_uri
    client = mlflow.MlflowClient(tracking_uri=store, registry_uri=store)
    mv = client.get_model_version_by_alias(t.name, "champion")
    v = mv.tags
    run = client.get_run(v["run_id"])
    p, m, rt = run.data.params, run.data.metrics, run.data.tags
    (cur,) = client.search_runs([run.info.experiment_id], f"tags.`dataset.digest` = '{v['dataset_digest']}'")
    cm, cp = cur.data.metrics, cur.data.params
    ev = client.get_run(v["eval.run_id"]).data.params
    wall = (run.info.end_time - run.info.start_time) / 1000
    workers, batch, accum = int(p["train.num_workers"]), int(p["train.batch_size"]), int(p["train.grad_accum"])
    throughput = statistics.median(x.value for x in client.get_metric_history(run.info.run_id, "images_per_s"))
    report_path = client.download_artifacts(cur.info.run_id, "curation/report.json", str(scratch))
    report = json.loads(Path(report_path).read_text())
    figures = {
        "UNet parameters": fmt_int(v["params.unet"]), "Text encoder 1 parameters": fmt_int(v["params.text_encoder"]),
        "Text encoder 2 parameters": fmt_int(v["params.text_encoder_2"]), "VAE parameters": fmt_int(v["params.vae"]),
        "Source weights sha256": f"`{v['lineage.weights_sha256']}`",
        "Registered as": f"models:/{t.name}/{mv.version}", "Training run": f"`{run.info.run_id}`",
        "Code": f"git `{v['git_commit']}`, config `{v['config_hash']}`",
        "Repository": "`terminus-test/tiny`", "Training code": f"the Terminus platform, git `{v['git_commit']}`",
        "diffusers weights, fp32 (`*/…safetensors`)": fmt_bytes(v["size.fp32_bytes"]),
        'diffusers weights, `variant="fp16"`': fmt_bytes(v["size.fp16_bytes"]),
        f"single file `{t.name}-v{mv.version}.safetensors` (fp16)": fmt_bytes(v["single_file.fp16.bytes"]),
        "single file sha256 (ModelSpec)": f"`{v['single_file.fp16.sha256']}`",
        "Source": f"`{cp['curate.source']}`", "Fine-tuned from": f"`{v['lineage.source']}` ({v['lineage.kind']})",
        "Images read": fmt_int(cm["inputs"]), "Kept": fmt_int(cm["kept"]), "Dropped": fmt_int(cm["dropped"]),
        **{f"Dropped: {k.removeprefix('dropped.')}": fmt_int(x) for k, x in cm.items() if k.startswith("dropped.")},
        "Filters": ", ".join(f"{k.removeprefix('curate.filters.')} {x}" for k, x in sorted(cp.items())
                             if k.startswith("curate.filters.")),
        "Captions by origin": ", ".join(f"{k.removeprefix('captions.')} {fmt_int(x)}" for k, x in sorted(cm.items())
                                        if k.startswith("captions.")),
        "Training rows": fmt_int(p["data.rows.train"]), "Held-out rows": fmt_int(p["data.rows.val"]),
        "Dataset digest": f"`{v['dataset_digest']}`",
        "Aspect buckets": f"area {fmt_int(cp['curate.buckets.area'])} px, sides multiples of "
                          f"{fmt_int(cp['curate.buckets.step'])} from {fmt_int(cp['curate.buckets.min_side'])} to "
                          f"{fmt_int(cp['curate.buckets.max_side'])}",
        "JPEG quality": fmt_int(cp["curate.jpeg_quality"]),
        "Held-out fraction": fmt_float(cp["curate.holdout_fraction"]),
        "Images per bucket": ", ".join(f"{b}: {fmt_int(n)}" for b, n in sorted(report["buckets"].items())),
        "Noise schedule": f"{p['diffusion.beta_schedule']} betas {p['diffusion.beta_start']} to "
                          f"{p['diffusion.beta_end']}, T = {fmt_int(p['diffusion.num_train_timesteps'])}",
        "Min-SNR gamma": p["diffusion.min_snr_gamma"],
        "Learning rate": f"warmup {fmt_int(p['train.lr.warmup_steps'])} steps, cosine {p['train.lr.max']} to "
                         f"{p['train.lr.min']}",
        "Batch": f"{batch} x {accum} accumulation x {workers} worker(s) = {batch * accum * workers}",
        "Optimizer steps": fmt_int(m["final_step"]), "Epochs started": fmt_int(m["epoch"] + 1),
        "Samples seen": fmt_int(m["samples_seen"]),
        "Precision": f"{p['train.precision']} configured, {rt['precision.effective']} used",
        "Optimizer": f"{p['train.optimizer']}, weight decay {p['train.weight_decay']}, gradient clipping "
                     f"{p['train.clip_grad_norm']}",
        "Caption dropout": p["train.caption_dropout"], "Seed": p["seed"],
        "Throughput (median over steps)": f"{fmt_float(throughput)} images/s",
        "Started": fmt_time(run.info.start_time), "Wall time (training and export)": fmt_seconds(wall),
        "GPU-hours": fmt_hours(0),
        "CPU-hours (reserved)": fmt_hours(wall / 3600 * workers * float(p["train.cpus_per_worker"])),
        "Peak memory, rank 0 (resident)": fmt_mb(m["peak_rss_mb"]),
        "Final training loss": fmt_float(m["final_loss"]), "Final held-out loss": fmt_float(m["final_val_loss"]),
        "Protocol id": f"`{v['eval.protocol']}`",
        "Held-out data": f"dataset `{v['eval.dataset_digest']}`, at most {fmt_int(p['train.val_max_rows'])} rows",
        "Loss timesteps": ", ".join(re.findall(r"\d+", p["train.val_timesteps"])),
        "Probe seeds": ", ".join(re.findall(r"-?\d+", ev["evaluate.seeds"])),
        "Probe images": f"{ev['evaluate.image_size']} px, {ev['evaluate.steps']} steps",
        "Blank threshold (pixel std)": ev["evaluate.blank_std"], "Evaluation run": f"`{v['eval.run_id']}`",
        "Held-out loss (min-SNR weighted)": fmt_float(v["eval.val_loss"]),
        "Mean luminance, dark prompts": fmt_float(v["eval.luminance_dark"]),
        "Mean luminance, bright prompts": fmt_float(v["eval.luminance_bright"]),
        "Luminance range": fmt_float(v["eval.luminance_range"]), "Images with NaN": fmt_float(v["eval.nan_images"]),
        "Blank images": fmt_float(v["eval.blank_images"]),
        "CPU": f"{rt['hardware.cpu']} ({rt['cpu.capability']} kernels)",
        "CPUs on the machine": rt["hardware.cpu_count"],
        "Workers": f"{p['train.num_workers']} x {p['train.cpus_per_worker']} CPU",
        "Hours used (wall)": fmt_hours(wall / 3600),
        **{f"Software: {k.removeprefix('software.')}": x for k, x in rt.items() if k.startswith("software.")},
    }
    return figures, {"version": mv, "run": run, "curation": cur, "params": p}


def test_the_card_reads_back_filled_from_mlflow(trained_champion, card, tmp_path):
    t = trained_champion
    folder, text, result = card
    header, body = split_card(text)
    assert header["license"] == "openrail++" and header["pipeline_tag"] == "text-to-image"
    assert header["library_name"] == "diffusers" and "stable-diffusion-xl" in header["tags"]
    # The tiny model starts from random weights: no Hub model to name, so no base_model (the Hub takes only
    # a Hub id there), as huggingface_hub's own parser of a README reads it; the card says where it started.
    assert "base_model" not in header and result["base_model"] is None
    hub_card = ModelCard(text)
    assert hub_card.data.base_model is None and hub_card.data.license == header["license"]
    assert hub_card.data.library_name == "diffusers" and hub_card.data.tags == header["tags"]
    assert "The lineage of this model reaches no Hub model: it starts from `tiny`" in body
    assert f"`{t.cfg.model.source}`" in body and t.cfg.model.source == "tiny"
    assert PLACEHOLDER not in text and "More Information" not in text and not PLACEHOLDERS.search(text)
    assert not re.search(r"\[(more information|optional|todo|tbd)[^\]]*\]|\bTODO\b|\{\{", text, re.I)

    # No empty section: every heading has text before the next heading, unless that one is its subsection.
    headings = [(m.start(), m.end(), len(m[1])) for m in re.finditer(r"^(#+) .+$", body, re.M)]
    for i, (_, end, level) in enumerate(headings):
        nxt = headings[i + 1] if i + 1 < len(headings) else (len(body), None, 0)
        if nxt[2] > level:
            continue
        assert body[end:nxt[0]].strip(), body[headings[i][0]:end]
    sections = {m[1] for m in re.finditer(r"^#{2,3} (.+)$", body, re.M)}
    assert {"Training data", "Preprocessing", "Training hyperparameters", "Speeds, sizes, times", "Protocol",
            "Results", "Validation images", "Compute infrastructure", "Model sources", "Uses", "Direct use",
            "Downstream use", "Out-of-scope use", "Bias, risks, and limitations", "Recommendations"} <= sections
    # Uses and risks follow the lineage: a random-weights root is a test of the platform, nothing more.
    assert "A test of the platform end to end" in body and "Any use other than testing the platform" in body
    assert "random weights, so it knows nothing beyond those images" in body

    figures, mlf = expected_figures(t, tmp_path)
    rows = table_rows(body)
    checked = set()
    for label, value in rows:
        if label in figures:
            assert value == figures[label], (label, value, figures[label])
            checked.add(label)
        else:  # a row MLflow does not back must state no number
            bare = unlinked(value).replace("fp16", "").replace("bf16", "").replace("fp32", "")
            assert not re.search(r"\d", bare), (label, value)
    assert len(checked) >= 60, sorted(set(figures) - checked)
    # Prose states no number: only tables, the code example, image captions and the title do.
    prose = re.sub(r"```.*?```", "", unlinked(body), flags=re.S)
    prose = "\n".join(line for line in prose.splitlines()
                      if not line.startswith(("|", "!", "*validation", "*evaluation", "# ")))
    prose = re.sub(r"`[^`]*`|fp16|bf16|fp32|A1111", "", prose)  # a tool name and precisions are not figures
    assert not re.findall(r".{0,30}\d.{0,30}", prose)
    # The usage example samples with the preset's settings (the training run's inference params).
    p = mlf["params"]
    code = re.search(r"```python\n(.*?)```", body, re.S)[1]
    for key in ("steps", "guidance_scale", "guidance_rescale", "width", "height"):
        name = "num_inference_steps" if key == "steps" else key
        assert f"{name}={p[f'inference.{key}']}" in code, key
    assert 'from_pretrained("terminus-test/tiny", variant="fp16"' in code

    # MLflow's figures are the real ones: counts, sizes and the curation agree with the things themselves.
    v, curation = mlf["version"].tags, mlf["curation"]
    pipe = StableDiffusionXLPipeline.from_pretrained(str(folder), dtype=torch.float32)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        assert int(v[f"params.{name}"]) == sum(x.numel() for x in pipe.components[name].parameters()), name
    weights = [q for q in folder.glob("*/*.safetensors")]
    assert int(v["size.fp32_bytes"]) == sum(q.stat().st_size for q in weights if ".fp16." not in q.name)
    assert int(v["size.fp16_bytes"]) == sum(q.stat().st_size for q in weights if ".fp16." in q.name)
    assert int(v["single_file.fp16.bytes"]) == (folder / f"{t.name}-v{t.version}.safetensors").stat().st_size
    assert curation.data.metrics["kept"] == t.curation["kept"]
    assert curation.data.metrics["inputs"] == t.curation["inputs"]
    assert float(v["eval.val_loss"]) == pytest.approx(t.evaluation["val_loss"], rel=1e-5)
    assert int(p["data.rows.train"]) == t.manifest.rows["train"]


def test_the_card_shows_the_validation_images_it_ships(card):
    folder, text, result = card
    linked = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert "images/probe_grid.png" in linked and any(p.startswith("images/val_0-step") for p in linked)
    for path in linked:
        assert (folder / path).is_file() and path in result["files"]
        assert (folder / path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert Path(folder / "README.md").is_file()
