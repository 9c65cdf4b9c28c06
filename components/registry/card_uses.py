"""The model card's words about where a version comes from and what it is for: its objective and summary,
its model sources, its uses (direct, downstream, out of scope) and its bias, risks and limitations, written
from the lineage's root (``components/registry/card.py`` ``lineage_root``), the run's ``diffusion.*`` params,
the licence and the curation's caption origins. Pure: it reads the card's ``Facts`` and the config, nothing
else (no MLflow), so each kind of root's wording is tested without a registry."""

from __future__ import annotations

from typing import Protocol

from components.config import Config
from components.registry.model import LINEAGE


class Facts(Protocol):
    """What these sections read of ``components.registry.card.Facts`` (MLflow's record of a version)."""

    name: str
    version: str
    version_tags: dict
    params: dict
    curation: object | None
    lineage_root: dict
    base_model: str | None


KIND_NAMES = {
    "tiny": "the platform's tiny test model, built from random weights",
    "sdxl_random": "SDXL at its published size with random weights",
    "directory": "a local diffusers folder",
    "s3": "a diffusers folder in S3",
    "single_file": "a single-file checkpoint",
    "registered": "a registered version this tracking store does not hold",
}
"""What a lineage root that is not a Hub model is, in the card's words (``lineage.kind``)."""
RANDOM_KINDS = {"tiny", "sdxl_random"}
"""Lineage kinds that start from random weights: what such a version draws, it learned from its data alone."""
PAPERS = (
    ("diffusion.zero_terminal_snr", "True", "Lin et al., *Common Diffusion Noise Schedules and Sample Steps are "
     "Flawed*", "https://arxiv.org/abs/2305.08891", "zero-terminal SNR, trailing spacing, guidance rescale"),
    ("diffusion.prediction_type", "v_prediction", "Salimans & Ho, *Progressive Distillation for Fast Sampling of "
     "Diffusion Models*", "https://arxiv.org/abs/2202.00512", "v-prediction"),
    ("diffusion.min_snr_gamma", None, "Hang et al., *Efficient Diffusion Training via Min-SNR Weighting Strategy*",
     "https://arxiv.org/abs/2303.09556", "min-SNR weighting"),
)
"""(param, value it must have -- None: any but ``None`` --, paper, link, what the recipe takes from it)."""
RAIL = {"openrail++", "openrail", "creativeml-openrail-m"}
"""Hub licence ids of the RAIL licences, whose use restrictions bind a model and its derivatives."""


def objective(p: dict) -> str:
    """The training objective in words, from the run's ``diffusion.*`` params."""
    pred = "v-prediction" if p["diffusion.prediction_type"] == "v_prediction" else "epsilon prediction"
    schedule = ("a zero-terminal-SNR noise schedule" if p["diffusion.zero_terminal_snr"] == "True"
                else "SDXL's original noise schedule")
    return f"{pred} on {schedule}"


def summary(f: Facts) -> str:
    """What the model is, by where its lineage starts: a fine-tune of a Hub model or of other weights, or a
    model trained from random weights."""
    kind, source = f.lineage_root.get(LINEAGE + "kind"), f.lineage_root.get(LINEAGE + "source") or ""
    if kind in RANDOM_KINDS:
        return "A Stable Diffusion XL model trained from random weights"
    return f"A full fine-tune of `{source}`, a Stable Diffusion XL model,"


def source_rows(f: Facts, repo_id: str) -> list[tuple[str, str]]:
    """Where the model, its base, its code and its recipe are (the seed card's "Model sources")."""
    kind, source = f.lineage_root.get(LINEAGE + "kind"), f.lineage_root.get(LINEAGE + "source") or ""
    if kind == "hub":
        base = f"[`{source}`](https://huggingface.co/{source})"
    else:
        base = f"none on the Hub: `{source}` ({KIND_NAMES.get(kind, kind or 'unrecorded')})"
        if f.base_model:
            base += f", named as a copy of [`{f.base_model}`](https://huggingface.co/{f.base_model})"
    papers = [f"[{title}]({url}) ({what})" for key, value, title, url, what in PAPERS
              if (f.params.get(key) == value if value else f.params.get(key) not in (None, "None"))]
    rows = [("Repository", f"`{repo_id}`"), ("Base model", base),
            ("Training code", f"the Terminus platform, git `{f.version_tags.get('git_commit')}`")]
    return rows + ([("Papers", "; ".join(papers))] if papers else [])


def uses_section(f: Facts, cfg: Config, single_file: str) -> str:
    """Direct, downstream and out-of-scope use, from the lineage's root, the objective and the licence."""
    kind, source = f.lineage_root.get(LINEAGE + "kind"), f.lineage_root.get(LINEAGE + "source") or ""
    random_root = kind in RANDOM_KINDS
    zt = f.params["diffusion.zero_terminal_snr"] == "True"
    wrong = "an epsilon" if f.params["diffusion.prediction_type"] == "v_prediction" else "a v-prediction"
    if random_root:
        direct = (f"A test of the platform end to end. Its lineage starts from `{source}` ({KIND_NAMES[kind]}), "
                  "and it learned only from the images under Training data, so what it draws shows that "
                  "training, export and serving work, not what a prompt describes.")
    else:
        direct = ("Text-to-image generation from English prompts, and image-to-image and inpainting with the "
                  f"same weights (the platform serves all three). It was trained with {objective(f.params)}"
                  + (", which lets it reach very dark and very bright images" if zt else "")
                  + "; sample it with the scheduler it ships (How to use) at the sizes of its aspect buckets "
                    "(Preprocessing).")
    downstream = (f"Further training on the Terminus platform: `model.source: models:/{f.name}/{f.version}` "
                  "continues it in full (the new version records this one as its parent) and `train.method: "
                  "lora` or `lokr` trains an adapter on it. The single file "
                  f"`{single_file}` is for ComfyUI, A1111 and Forge, which read its schedule keys; a tool that "
                  "does not read them needs the settings of How to use.")
    if random_root:
        downstream += " A version that starts from random weights is a starting point for tests only."
    out = ["Any use other than testing the platform." if random_root else
           "Prompts far from what its training images show (Training data): it draws what those suggest.",
           f"Sampling it with {wrong} setting"
           + (", or with a sampler that never reaches the last timestep (leading spacing)" if zt else "")
           + ": the images come out washed out or broken.",
           "Images of real people without their consent, images meant to deceive or harass, and depictions "
           "presented as fact: the model draws what its training images suggest, not what is true."]
    if cfg.publish.license in RAIL:
        out.append(f"Whatever the use restrictions of its licence (`{cfg.publish.license}`, a RAIL licence) forbid; "
                   "they bind every use of the model and of its derivatives.")
    else:
        out.append(f"Whatever its licence (`{cfg.publish.license}`) does not allow.")
    return ("## Uses\n\n### Direct use\n\n" + direct + "\n\n### Downstream use\n\n" + downstream
            + "\n\n### Out-of-scope use\n\n" + "\n".join(f"- {line}" for line in out))


def risks_section(f: Facts) -> str:
    """Bias, risks and limitations, from the training data's curation, the lineage's root and the objective."""
    kind, source = f.lineage_root.get(LINEAGE + "kind"), f.lineage_root.get(LINEAGE + "source") or ""
    origin = (f"the curation run `{f.curation.info.run_id}`" if f.curation is not None
              else f"`{f.params.get('train.data')}`")
    parts = [f"The model learned from the images and captions of its training data ({origin}, under Training "
             "data): what those images show, and what they leave out, it reproduces."]
    if kind == "hub":
        parts.append(f"It also carries what `{source}` learned from its own training data, biases included; "
                     "that model's card describes it.")
    elif kind in RANDOM_KINDS:
        parts.append("Its lineage starts from random weights, so it knows nothing beyond those images.")
    else:
        parts.append(f"It also carries what its starting weights (`{source}`) learned, which this record does "
                     "not describe.")
    captions = f.curation.data.metrics if f.curation is not None else {}
    if captions.get("captions.filename", 0) > 0:
        parts.append("Some images had no caption and were captioned with their file name (Captions by origin), "
                     "which ties words to pictures they may not describe.")
    if captions.get("captions.empty", 0) > 0:
        parts.append("Some images were trained with an empty caption (Captions by origin).")
    parts.append("Its evaluation measures held-out loss and how dark and how bright its images get for dark and "
                 "bright prompts; it measures neither image quality, prompt adherence nor bias.")
    if f.params["diffusion.zero_terminal_snr"] == "True":
        parts.append("It needs a sampler that reaches the last timestep (trailing spacing) and a "
                     f"{'v-prediction' if f.params['diffusion.prediction_type'] == 'v_prediction' else 'epsilon'} "
                     "setting; samplers that clamp the terminal noise level give washed-out images.")
    recommendations = ("Review generated images before using them, for what they show and whom they leave out; "
                       "do not publish them as photographs. Compare versions only under the same evaluation "
                       "protocol id, and sample with the scheduler the folder ships (How to use).")
    return "## Bias, risks, and limitations\n\n" + " ".join(parts) + "\n\n### Recommendations\n\n" + recommendations
