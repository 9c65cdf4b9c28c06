"""The inference-pipeline factory: sources, three modes, seeds, ZT-SNR scheduler, CFG rescale default."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionXLInpaintPipeline, StableDiffusionXLPipeline
from PIL import Image

from components.config import DiffusionConfig, InferenceConfig, TinyModelConfig
from components.diffusion.pipelines import ZTSNRPipelines, build_pipelines, half_variants, variant_for
from components.diffusion.request import GenerationRequest
from components.diffusion.schedule import inference_scheduler
from components.diffusion.sdxl import save_pipeline
from components.diffusion.tiny import build_tiny

CPU = torch.device("cpu")
SIZE = dict(width=64, height=64, steps=3)


@pytest.fixture(scope="module")
def parts():
    return build_tiny(TinyModelConfig())


@pytest.fixture(scope="module")
def pipes(parts) -> ZTSNRPipelines:
    return build_pipelines(parts, inference_scheduler(DiffusionConfig()), InferenceConfig().model_dump(), device=CPU)


@pytest.fixture(scope="module")
def saved(parts, tmp_path_factory) -> Path:
    return save_pipeline(parts, DiffusionConfig(), tmp_path_factory.mktemp("pipes") / "pipe")


def pixels(images: list[Image.Image]) -> np.ndarray:
    return np.stack([np.asarray(im) for im in images])


def assert_zt_snr_scheduler(pipe) -> None:
    sched = pipe.scheduler
    assert isinstance(sched, DDIMScheduler)
    assert sched.config.timestep_spacing == "trailing" and sched.config.rescale_betas_zero_snr
    assert sched.config.prediction_type == "v_prediction"


def test_from_components_shares_the_weights(parts, pipes):
    assert pipes.t2i.unet is parts.unet and pipes.device.type == "cpu"
    assert_zt_snr_scheduler(pipes.t2i)
    for mode in ("img2img", "inpaint"):
        view = pipes.view(mode)
        assert view.unet is parts.unet and view is pipes.view(mode)  # built once, same weights
    assert isinstance(pipes.view("inpaint"), StableDiffusionXLInpaintPipeline)


def test_from_a_directory_runs_the_given_zt_snr_scheduler(saved, parts):
    (saved / "scheduler" / "scheduler_config.json").write_text(
        '{"_class_name": "DDIMScheduler", "prediction_type": "epsilon", "timestep_spacing": "leading"}'
    )  # a directory whose scheduler says otherwise
    pipes = build_pipelines(str(saved), inference_scheduler(DiffusionConfig()), InferenceConfig().model_dump(),
                            device=CPU)
    assert_zt_snr_scheduler(pipes.t2i)
    assert pipes.t2i.unet.dtype == torch.float32
    assert torch.equal(pipes.t2i.unet.conv_in.weight, parts.unet.conv_in.weight)
    images = pipes.generate(GenerationRequest("a cat", seed=0, **SIZE))
    assert images[0].size == (64, 64)


def test_text2img_seeds(pipes):
    req = GenerationRequest("a red cube", seed=7, n=2, **SIZE)
    first, again = pixels(pipes.generate(req)), pixels(pipes.generate(req))
    assert first.shape == (2, 64, 64, 3)
    assert np.array_equal(first, again)  # same seed and inputs: same images
    other = pixels(pipes.generate(GenerationRequest("a red cube", seed=8, n=2, **SIZE)))
    assert not np.array_equal(first, other)
    assert not np.array_equal(first[0], first[1])  # n images get distinct streams (seed + i)


def test_img2img_and_inpaint(pipes):
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    for extra in ({"image": image}, {"image": image, "mask": mask}):
        req = GenerationRequest("a cat", seed=3, strength=0.7, **SIZE, **extra)
        out = pixels(pipes.generate(req))
        assert out.shape == (1, 64, 64, 3)
        assert np.array_equal(out, pixels(pipes.generate(req)))
        other = GenerationRequest("a cat", seed=4, strength=0.7, **SIZE, **extra)
        assert not np.array_equal(out, pixels(pipes.generate(other)))
    assert GenerationRequest("x", image=image).mode == "img2img"
    assert GenerationRequest("x", image=image, mask=mask).mode == "inpaint"
    assert GenerationRequest("x").mode == "text2img"


class Spy:
    """Records the keyword arguments a pipeline is called with, then calls it."""

    def __init__(self, pipe):
        self.pipe, self.calls = pipe, []

    def __call__(self, **kwargs):
        self.calls.append(kwargs)
        return self.pipe(**kwargs)

    def __getattr__(self, name):
        return getattr(self.pipe, name)


@pytest.mark.parametrize("rescale", [None, 0.3])
def test_guidance_rescale_default_flows_from_the_inference_config(parts, rescale):
    defaults = InferenceConfig() if rescale is None else InferenceConfig(guidance_rescale=rescale)
    pipes = build_pipelines(parts, inference_scheduler(DiffusionConfig()), defaults.model_dump(), device=CPU)
    pipes.t2i = Spy(pipes.t2i)
    pipes.generate(GenerationRequest("a cat", seed=0, **SIZE))
    call = pipes.t2i.calls[-1]
    assert call["guidance_rescale"] == (0.7 if rescale is None else 0.3)
    assert call["guidance_scale"] == defaults.guidance_scale
    assert call["num_inference_steps"] == 3  # explicit fields win over the defaults
    assert GenerationRequest("x").guidance_rescale is None  # unset until the pipelines complete it
    assert pipes.complete(GenerationRequest("x")).guidance_rescale == defaults.guidance_rescale
    assert InferenceConfig().guidance_rescale == 0.7
    assert pipes.complete(GenerationRequest("x")).steps == defaults.steps


def test_guidance_rescale_changes_the_output(pipes):
    plain = pixels(pipes.generate(GenerationRequest("a cat", seed=1, guidance_rescale=0.0, **SIZE)))
    rescaled = pixels(pipes.generate(GenerationRequest("a cat", seed=1, guidance_rescale=0.7, **SIZE)))
    assert not np.array_equal(plain, rescaled)


def test_default_inpainting_starts_from_pure_noise_and_keeps_the_unmasked_pixels(pipes):
    """Strength defaults to the preset's 1.0 (the card's headline use: a ZT-SNR model inpaints from
    t = 999, where it reaches its full range); outside the mask the result is the input itself."""
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    seen: list[int] = []
    hook = pipes.t2i.unet.register_forward_pre_hook(lambda _m, args: seen.append(int(args[1].flatten()[0])))
    try:
        out = pixels(pipes.generate(GenerationRequest("a cat", seed=3, image=image, mask=mask, **SIZE)))[0]
    finally:
        hook.remove()
    assert InferenceConfig().inpaint_strength == 1.0 and seen[0] == 999  # trailing spacing: t = 999 first
    keep = np.asarray(mask) == 0
    assert np.array_equal(out[keep], np.asarray(image)[keep])  # untouched outside the mask
    assert np.abs(out[~keep].astype(int) - np.asarray(image)[~keep]).mean() > 10  # repainted inside


def test_a_bf16_pipeline_decodes_with_the_vae_in_fp32(saved):
    """diffusers upcasts only an fp16 VAE; here the VAE stays fp32 for every mode, and a bf16 pipeline's
    images are those of the fp32 pipeline up to the UNet's own rounding."""
    scheduler, defaults = inference_scheduler(DiffusionConfig()), InferenceConfig().model_dump()
    low = build_pipelines(str(saved), scheduler, defaults, device=CPU, dtype=torch.bfloat16)
    assert low.t2i.unet.dtype == torch.bfloat16 and low.t2i.vae.dtype == torch.float32
    image = Image.new("RGB", (64, 64), (120, 60, 200))
    for extra in ({}, {"image": image}):
        out = pixels(low.generate(GenerationRequest("a cat", seed=5, **SIZE, **extra)))
        assert out.shape == (1, 64, 64, 3) and out.std() > 0
        assert low.t2i.vae.dtype == torch.float32  # img2img's encode cast it to bf16; the decode casts back


def test_the_variant_that_suits_the_device(parts, saved, tmp_path):
    """A folder registered with its fp16 variant: a CUDA device reads the variant in fp16, a CPU the fp32
    weights; a folder without a variant gives CUDA the fp32 weights cast to bf16 (as before variants)."""
    with_fp16 = save_pipeline(parts, DiffusionConfig(), tmp_path / "fp16", variant="fp16")
    with_bf16 = save_pipeline(parts, DiffusionConfig(), tmp_path / "bf16", variant="bf16")
    cuda = torch.device("cuda")  # a device object only: nothing runs on it here
    assert half_variants(saved) == [] and half_variants(with_fp16) == ["fp16"] and half_variants(with_bf16) == ["bf16"]
    assert variant_for(with_fp16, cuda) == ("fp16", torch.float16)
    assert variant_for(with_bf16, cuda) == ("bf16", torch.bfloat16)
    assert variant_for(saved, cuda) == (None, torch.bfloat16)
    assert variant_for(with_fp16, CPU) == (None, torch.float32)
    (with_fp16 / "vae" / "diffusion_pytorch_model.fp16.safetensors").unlink()
    assert half_variants(with_fp16) == []  # a variant missing for one model is no variant

    # Vanilla diffusers: the plain load is fp32 throughout (the variant left the configs alone), the variant half.
    plain = StableDiffusionXLPipeline.from_pretrained(str(with_bf16), use_safetensors=True)
    assert {m.dtype for m in (plain.unet, plain.vae, plain.text_encoder, plain.text_encoder_2)} == {torch.float32}
    half = StableDiffusionXLPipeline.from_pretrained(str(with_bf16), variant="bf16", dtype=torch.bfloat16)
    assert {m.dtype for m in (half.unet, half.text_encoder, half.text_encoder_2)} == {torch.bfloat16}
    loaded = build_pipelines(with_bf16, inference_scheduler(DiffusionConfig()), InferenceConfig().model_dump(),
                             device=CPU)
    assert loaded.t2i.unet.dtype == torch.float32
    ours, theirs = parts.unet.state_dict(), loaded.t2i.unet.state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)  # the fp32 weights, not the rounded ones
