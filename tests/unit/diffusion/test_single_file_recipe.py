"""What a plain diffusers user gets from an exported single file, and the scheduler recipe that samples it
as the platform does (docs/interchange.md, "Sampling a single file with diffusers").

diffusers' ``from_single_file`` never reads the file's ``v_pred``/``ztsnr`` markers or its metadata: the
scheduler comes from the ``config=`` folder (left unset, SDXL base's from the Hub: an epsilon
``EulerDiscreteScheduler`` with leading spacing). The tests load the tiny model's file against a folder
whose ``model_index.json`` and ``scheduler/`` are SDXL base's (so no network), show that default, apply the
recipe and compare the image with the platform's own pipeline loaded from the same file."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler, StableDiffusionXLPipeline

from components.config import load_config
from components.diffusion import single_file as sf
from components.diffusion.pipelines import build_pipelines
from components.diffusion.request import GenerationRequest
from components.diffusion.schedule import inference_scheduler
from components.diffusion.sdxl import _parts, load_single_file, save_pipeline
from components.diffusion.tiny import build_tiny
from tests.fixtures.processes import REPO

SDXL_BASE_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler", "_diffusers_version": "0.19.0.dev0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False, "interpolation_type": "linear",
    "num_train_timesteps": 1000, "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": False,
    "skip_prk_steps": True, "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": None,
    "use_karras_sigmas": False,
}
"""``scheduler/scheduler_config.json`` of ``stabilityai/stable-diffusion-xl-base-1.0``, whose ``model_index.json``
names ``["diffusers", "EulerDiscreteScheduler"]``: what ``from_single_file`` configures without ``config=``."""
RECIPE = {"prediction_type": "v_prediction", "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}
"""The three settings docs/interchange.md tells a diffusers user to set."""
SEED, STEPS, SIDE = 3, 4, 64


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(preset, the tiny model's folder as training registers it, its fp16 single file, a config folder with
    the tiny model's component configs and SDXL base's scheduler)."""
    cfg = load_config(REPO / "flows/configs/tiny.yaml")
    root = tmp_path_factory.mktemp("recipe")
    folder = save_pipeline(build_tiny(cfg.model.tiny), cfg.diffusion, root / "pipe")
    path = sf.export_pipeline(folder, root / "tiny.safetensors", "fp16", title="tiny recipe",
                              date="2024-05-01T00:00:00Z", resolution=(SIDE, SIDE), license="openrail++", metadata={})
    base = root / "sdxl-base-like"
    shutil.copytree(folder, base, ignore=shutil.ignore_patterns("*.safetensors"))  # configs and tokenizers only
    index = json.loads((base / "model_index.json").read_text())
    (base / "model_index.json").write_text(json.dumps({**index, "scheduler": ["diffusers", "EulerDiscreteScheduler"]}))
    (base / "scheduler" / "scheduler_config.json").write_text(json.dumps(SDXL_BASE_SCHEDULER))
    return cfg, folder, path, base


@pytest.fixture(scope="module")
def vanilla(exported):
    """(pipeline, the scheduler it was loaded with): the file as a diffusers user loads it, against SDXL base's
    pipeline and scheduler configs. Tests set ``pipeline.scheduler`` from the one it was loaded with."""
    _, _, path, base = exported
    pipe = StableDiffusionXLPipeline.from_single_file(str(path), config=str(base), dtype=torch.float32,
                                                      local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe, pipe.scheduler


@pytest.fixture(scope="module")
def platform_image(exported) -> np.ndarray:
    """The platform's own image of the same file: its single-file loader, its serving pipeline and scheduler,
    the preset's guidance settings."""
    cfg, folder, path, _ = exported
    parts = _parts(load_single_file(path, str(folder), cfg.diffusion))
    pipes = build_pipelines(parts, inference_scheduler(cfg.diffusion), cfg.inference.model_dump(),
                            device=torch.device("cpu"))
    req = GenerationRequest(prompt="a red cube on a table", steps=STEPS, width=SIDE, height=SIDE, seed=SEED)
    return pipes.generate(req, output_type="np")[0]


def settings(scheduler) -> dict:
    """The settings a scheduler is built from (its ``__init__`` arguments), as its config holds them."""
    return {k: scheduler.config[k] for k in type(scheduler)._get_init_keys(type(scheduler)) - {"self", "kwargs"}}


def sample(pipe, cfg) -> np.ndarray:
    """One seeded text-to-image call with the preset's guidance (``guidance_rescale`` included), as plain
    diffusers is called."""
    return pipe("a red cube on a table", num_inference_steps=STEPS, guidance_scale=cfg.inference.guidance_scale,
                guidance_rescale=cfg.inference.guidance_rescale, width=SIDE, height=SIDE, output_type="np",
                generator=torch.Generator().manual_seed(SEED)).images[0]


def test_from_single_file_takes_the_scheduler_from_config_not_from_the_file_markers(exported, vanilla):
    """The file says v-prediction and ZT-SNR (its ``v_pred``/``ztsnr`` keys, its ModelSpec header); the
    pipeline loaded from it against SDXL base's configs samples epsilon with leading spacing and no rescale,
    and the same file against the version's own folder gets that folder's scheduler."""
    cfg, folder, path, _ = exported
    keys = sf.read_keys(path)
    assert sf.V_PRED_KEY in keys and sf.ZTSNR_KEY in keys
    default = vanilla[1]
    assert isinstance(default, EulerDiscreteScheduler)
    assert (default.config.prediction_type, default.config.rescale_betas_zero_snr, default.config.timestep_spacing) \
        == ("epsilon", False, "leading")
    own = StableDiffusionXLPipeline.from_single_file(str(path), config=str(folder), dtype=torch.float32,
                                                     local_files_only=True).scheduler
    ours = inference_scheduler(cfg.diffusion)
    assert type(own) is type(ours) and settings(own) == settings(ours)


def test_the_recipe_gives_the_platform_scheduler_and_its_image(exported, vanilla, platform_image):
    """``DDIMScheduler.from_config(pipe.scheduler.config, **RECIPE)`` is the platform's serving scheduler on
    every setting DDIM reads, and one seeded call gives the platform's image exactly: the same weights (both
    read the same file), the same scheduler and the same diffusers pipeline code leave nothing to differ."""
    cfg, (pipe, loaded) = exported[0], vanilla
    ours = inference_scheduler(cfg.diffusion)
    pipe.scheduler = DDIMScheduler.from_config(loaded.config, **RECIPE)
    assert settings(pipe.scheduler) == settings(ours)
    assert ours.config.prediction_type == cfg.diffusion.prediction_type.value == RECIPE["prediction_type"]
    assert ours.config.rescale_betas_zero_snr is cfg.diffusion.zero_terminal_snr is RECIPE["rescale_betas_zero_snr"]
    assert ours.config.timestep_spacing == RECIPE["timestep_spacing"]
    image = sample(pipe, cfg)
    assert image.std() > 0.01  # an image, not a constant
    assert np.array_equal(image, platform_image)

    # Without the recipe the same call gives another image: the comparison above can fail.
    pipe.scheduler = loaded
    assert np.abs(sample(pipe, cfg) - platform_image).max() > 0.1


def test_euler_with_the_recipe_differs_from_the_platform_only_by_its_last_step(exported, vanilla, platform_image):
    """SDXL base's own Euler class with the same three settings is DDIM's update written in sigma space
    (Karras et al. 2022, sec. 4), with one difference: Euler's last step lands on sigma 0, the platform's
    DDIM (``set_alpha_to_one=False``) on the noise level of t = 0. DDIM told to land on sigma 0 gives Euler's
    image within 1e-3 (Euler's first sigma stands in for the infinite one of ZT-SNR with 2**24, so fp32
    keeps about 1e-4 of it); the platform's image is within a few hundredths of it (pixels in [0, 1])."""
    cfg, (pipe, loaded) = exported[0], vanilla
    pipe.scheduler = EulerDiscreteScheduler.from_config(loaded.config, **RECIPE)
    euler = sample(pipe, cfg)
    pipe.scheduler = DDIMScheduler.from_config(loaded.config, **RECIPE, set_alpha_to_one=True)
    to_zero = sample(pipe, cfg)
    assert np.abs(euler - to_zero).max() < 1e-3
    gap = np.abs(euler - platform_image).max()
    assert 1e-3 < gap < 0.05, gap
