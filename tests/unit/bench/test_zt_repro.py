"""The ZT-SNR reproduction's parts, and one run at a trivially small size (not the benchmark)."""

from __future__ import annotations

import torch

from bench.zt_repro import (
    ARMS,
    brightness,
    encode_mean,
    fit_autoencoder,
    make_dataset,
    run_repro,
    sd_default_sampler,
)
from components.config import DiffusionConfig, TinyModelConfig
from components.diffusion.tiny import build_tiny


def test_dataset_is_half_dark_half_bright():
    pixels, values = make_dataset(16, 32, seed=0)
    assert pixels.shape == (16, 3, 32, 32) and values.shape == (16,)
    assert pixels.min() >= -1 and pixels.max() <= 1
    assert torch.allclose(brightness(pixels), values, atol=1e-6)
    assert (values[0::2] < 0.25).all() and (values[1::2] > 0.75).all()
    assert torch.equal(make_dataset(16, 32, seed=0)[0], pixels)  # seeded
    assert not torch.equal(pixels[0], pixels[2])  # texture and tint differ


def test_arms_differ_only_in_schedule_and_target():
    zt, default = ARMS["zt_v"], ARMS["default_eps"]
    assert zt.zero_terminal_snr and not default.zero_terminal_snr
    assert zt.prediction_type.value == "v_prediction" and default.prediction_type.value == "epsilon"
    assert zt.model_dump(exclude={"zero_terminal_snr", "prediction_type"}) == default.model_dump(
        exclude={"zero_terminal_snr", "prediction_type"}
    )


def test_sd_default_sampler_is_leading_and_skips_the_top():
    sched = sd_default_sampler(DiffusionConfig(zero_terminal_snr=False))
    sched.set_timesteps(25)
    assert sched.timesteps[0].item() == 961 and sched.config.timestep_spacing == "leading"
    assert sched.alphas_cumprod[-1].item() > 0  # the flawed schedule: SNR_T > 0


def test_fitted_vae_posterior_is_deterministic():
    vae = build_tiny(TinyModelConfig()).vae
    pixels, _ = make_dataset(4, 64, seed=1)
    fit_autoencoder(vae, pixels, steps=1, seed=0, resolution=32)
    dist = vae.encode(pixels).latent_dist
    assert dist.std.max().item() < 1e-4
    assert not any(p.requires_grad for p in vae.parameters())
    assert encode_mean(vae, pixels, chunk=3).shape == (4, 4, 8, 8)


def test_run_repro_tiny():
    out = run_repro(
        steps=2, batch=2, n_data=4, n_samples=2, sample_steps=2, image_size=32, vae_fit_steps=1
    )
    assert set(out) == {"settings", "data", "arms", "total_s"}
    assert set(out["arms"]) == {"zt_v", "default_eps", "default_eps_trailing"}
    assert out["settings"]["latent_shape"] == [4, 4, 4]
    assert out["data"]["spread_ratio"] == 1.0
    for arm in out["arms"].values():
        assert {"brightness_std", "spread_ratio", "latent_mean_std", "final_loss", "first_timestep"} <= set(arm)
        assert 0.0 <= arm["brightness_mean"] <= 1.0
        probe = arm["probe"]  # the evaluation probe's statistics on the same samples
        assert 0.0 <= probe["luminance_min"] <= probe["luminance_max"] <= 1.0 and probe["luminance_spread"] >= 0
    assert out["arms"]["zt_v"]["first_timestep"] == 999
    assert out["arms"]["default_eps_trailing"]["first_timestep"] == 999
    assert out["arms"]["default_eps"]["first_timestep"] < 999
