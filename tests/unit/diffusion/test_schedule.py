"""Diffusion math against the published figures (docs/recipe.md), an independent numpy implementation
of Lin et al. 2023 Algorithm 1 + Hang et al. 2023 min-SNR-gamma, and diffusers itself."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr

from components.config import DiffusionConfig, PredictionType, TerminalPolicy
from components.diffusion.schedule import (
    inference_scheduler,
    min_snr_weights,
    per_sample_mse,
    sample_timesteps,
    scheduler_kwargs,
    snr,
    training_scheduler,
    training_target,
    weighted_loss,
)

T = 1000
ZT = DiffusionConfig()  # ZT-SNR, v-prediction, min-SNR 5, terminus policy
DEFAULT = DiffusionConfig(zero_terminal_snr=False)
# docs/recipe.md's table (v-prediction, g = 5, ZT schedule), kept as printed to know its precision.
TABLE = {0: "0.0043", 200: "0.737", 500: "0.241", 800: "0.018", 900: "0.003", 990: "1.7e-5"}


def significant_figures(printed: str) -> int:
    mantissa = printed.lower().split("e")[0].replace(".", "").lstrip("0")
    return len(mantissa)


# --- independent reference (float64 numpy, from the betas; no diffusers) -------------------------


def ref_alphabar(zero_terminal_snr: bool) -> np.ndarray:
    """SDXL's scaled_linear betas, optionally rescaled by Lin et al. 2023 Algorithm 1."""
    betas = np.linspace(0.00085**0.5, 0.012**0.5, T, dtype=np.float64) ** 2
    alphabar = np.cumprod(1.0 - betas)
    if not zero_terminal_snr:
        return alphabar
    s = np.sqrt(alphabar)
    s0, s_last = s[0], s[-1]
    s = (s - s_last) * s0 / (s0 - s_last)  # shift so the last is 0, scale so the first is unchanged
    ab = s**2
    alphas = np.concatenate([ab[:1], ab[1:] / ab[:-1]])  # back to per-step alphas / betas
    return np.cumprod(alphas)


def ref_weights(alphabar: np.ndarray, gamma: float, prediction: str, terminal: str) -> np.ndarray:
    """Hang et al. 2023: v min(SNR,g)/(SNR+1), eps min(SNR,g)/SNR; SNR == 0 by policy."""
    out = np.empty_like(alphabar)
    for i, ab in enumerate(alphabar):
        s = ab / (1.0 - ab)
        if s == 0:
            out[i] = 1.0 if terminal == "terminus" else 0.0
        elif prediction == "v_prediction":
            out[i] = min(s, gamma) / (s + 1.0)
        else:
            out[i] = min(s, gamma) / s
    return out


def ours(cfg: DiffusionConfig, terminal=None, prediction=None) -> torch.Tensor:
    sched = training_scheduler(cfg)
    return min_snr_weights(
        snr(sched.alphas_cumprod), cfg.min_snr_gamma, prediction or cfg.prediction_type,
        terminal or cfg.terminal_policy,
    )


# --- the schedule --------------------------------------------------------------------------------


def test_default_schedule_terminal_figures():
    ab = training_scheduler(DEFAULT).alphas_cumprod
    assert ab[-1].sqrt().item() == pytest.approx(0.068265, rel=1e-4)
    assert snr(ab)[-1].item() == pytest.approx(0.004682, rel=1e-4)
    ref = ref_alphabar(False)
    assert np.sqrt(ref[-1]) == pytest.approx(0.068265, rel=1e-4)
    np.testing.assert_allclose(ab.double().numpy(), ref, rtol=1e-5)


def test_zero_terminal_snr_schedule():
    ab = training_scheduler(ZT).alphas_cumprod
    ab_default = training_scheduler(DEFAULT).alphas_cumprod
    assert ab[-1].item() == 0.0 and snr(ab)[-1].item() == 0.0  # exactly, not clamped
    assert ab[0].item() == pytest.approx(ab_default[0].item(), rel=1e-6)  # first alphabar unchanged
    assert bool(torch.all(ab[1:] < ab[:-1]))  # strictly decreasing
    assert bool(torch.all(snr(ab)[:-1] > 0))  # only the terminal step has SNR 0


def test_schedule_parity_with_diffusers_and_algorithm_1():
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, T, dtype=torch.float32) ** 2  # scaled_linear
    sched = training_scheduler(ZT)
    assert torch.equal(sched.betas, rescale_zero_terminal_snr(betas))
    ab_ref = ref_alphabar(True)
    np.testing.assert_allclose(sched.alphas_cumprod.double().numpy()[:-1], ab_ref[:-1], rtol=1e-4)
    assert ab_ref[-1] == 0.0
    # inference uses the very same betas
    assert torch.equal(inference_scheduler(ZT).alphas_cumprod, sched.alphas_cumprod)


def test_trailing_spacing_starts_at_t_999():
    sched = inference_scheduler(ZT)
    sched.set_timesteps(30)
    expected = np.round(np.arange(T, 0, -T / 30)).astype(np.int64) - 1  # Lin et al. Table 2
    assert sched.timesteps[0].item() == 999
    assert sched.timesteps.tolist() == expected.tolist()
    cfg = sched.config
    assert cfg.timestep_spacing == "trailing" and cfg.rescale_betas_zero_snr
    assert cfg.prediction_type == "v_prediction" and not cfg.clip_sample


def test_scheduler_kwargs_follow_the_config():
    kw = scheduler_kwargs(DiffusionConfig(zero_terminal_snr=False, prediction_type=PredictionType.EPSILON))
    assert kw["rescale_betas_zero_snr"] is False and kw["prediction_type"] == "epsilon"
    assert kw["beta_schedule"] == "scaled_linear" and kw["num_train_timesteps"] == T


# --- min-SNR-gamma weights -------------------------------------------------------------------------


def test_weight_table_paper_and_terminus():
    paper = ours(ZT, terminal=TerminalPolicy.PAPER)
    terminus = ours(ZT, terminal=TerminalPolicy.TERMINUS)
    ref = ref_weights(ref_alphabar(True), 5.0, "v_prediction", "paper")
    for t, printed in TABLE.items():
        assert paper[t].item() == pytest.approx(ref[t], rel=1e-4)
        # agreement with the published table at its printed precision (2 significant figures)
        digits = significant_figures(printed)
        assert float(f"{paper[t].item():.{digits}g}") == pytest.approx(float(printed), rel=1e-9)
        assert paper[t].item() == terminus[t].item()
    assert paper[999].item() == 0.0
    assert terminus[999].item() == 1.0


@pytest.mark.parametrize("zt", [True, False])
@pytest.mark.parametrize("prediction", ["v_prediction", "epsilon"])
@pytest.mark.parametrize("terminal", ["paper", "terminus"])
@pytest.mark.parametrize("gamma", [5.0, 1.0])
def test_weights_match_independent_reference_everywhere(zt, prediction, terminal, gamma):
    cfg = DiffusionConfig(zero_terminal_snr=zt, min_snr_gamma=gamma)
    got = ours(cfg, terminal=TerminalPolicy(terminal), prediction=PredictionType(prediction))
    ref = ref_weights(ref_alphabar(zt), gamma, prediction, terminal)
    assert torch.isfinite(got).all()
    np.testing.assert_allclose(got.double().numpy(), ref, rtol=1e-4, atol=0)


def test_plain_strings_give_the_same_weights_as_enums():
    s = torch.tensor([0.0, 0.5, 10.0])
    by_enum = min_snr_weights(s, 5.0, PredictionType.V, TerminalPolicy.TERMINUS)
    assert torch.equal(min_snr_weights(s, 5.0, "v_prediction", "terminus"), by_enum)
    assert torch.allclose(by_enum, torch.tensor([1.0, 0.5 / 1.5, 5.0 / 11.0]))


def test_gamma_none_is_unweighted():
    s = snr(training_scheduler(ZT).alphas_cumprod)
    assert torch.equal(min_snr_weights(s, None, PredictionType.EPSILON, TerminalPolicy.PAPER), torch.ones(T))


@pytest.mark.parametrize("terminal", list(TerminalPolicy))
def test_epsilon_path_never_nan_or_inf(terminal):
    cfg = DiffusionConfig(prediction_type=PredictionType.EPSILON, terminal_policy=terminal)
    sched = training_scheduler(cfg)
    w = min_snr_weights(snr(sched.alphas_cumprod), 5.0, cfg.prediction_type, terminal)
    assert torch.isfinite(w).all()
    assert w[999].item() == (1.0 if terminal is TerminalPolicy.TERMINUS else 0.0)
    tiny = torch.tensor([0.0, 1e-30, 1e-12, 4.0, 6.0])  # 0/0 and near-0/near-0
    assert torch.isfinite(min_snr_weights(tiny, 5.0, PredictionType.EPSILON, terminal)).all()

    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 4, 8, 8, generator=gen)
    noise = torch.randn(4, 4, 8, 8, generator=gen)
    t = torch.tensor([0, 500, 998, 999])
    pred = torch.randn(4, 4, 8, 8, generator=gen, requires_grad=True)
    loss = weighted_loss(per_sample_mse(pred, training_target(sched, x0, noise, t)), t, sched, cfg)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(pred.grad).all()


def test_loss_uses_snr_of_the_rescaled_schedule():
    """Guards the known trainer bug of computing SNR before the ZT rescale."""
    sched = training_scheduler(ZT)
    t = torch.tensor([0, 200, 800, 990, 999])
    pred = torch.ones(5, 4, 2, 2)
    target = torch.zeros(5, 4, 2, 2)  # per-sample MSE exactly 1
    ref = ref_weights(ref_alphabar(True), 5.0, "v_prediction", "terminus")[t.numpy()]
    pre_rescale = ref_weights(ref_alphabar(False), 5.0, "v_prediction", "terminus")[t.numpy()]
    for i in range(5):
        got = weighted_loss(per_sample_mse(pred[i:i + 1], target[i:i + 1]), t[i:i + 1], sched, ZT).item()
        assert got == pytest.approx(ref[i], rel=1e-4)
    assert abs(ref[3] - pre_rescale[3]) / ref[3] > 10  # the two really differ (t = 990)


def test_loss_is_per_sample_mse_times_weights():
    sched = training_scheduler(ZT)
    gen = torch.Generator().manual_seed(1)
    pred, target = torch.randn(3, 4, 4, 4, generator=gen), torch.randn(3, 4, 4, 4, generator=gen)
    t = torch.tensor([10, 400, 999])
    w = ours(ZT)[t]
    expected = (((pred - target) ** 2).mean(dim=(1, 2, 3)) * w).mean()
    assert weighted_loss(per_sample_mse(pred, target), t, sched, ZT).item() == pytest.approx(expected.item(), rel=1e-6)


# --- targets and timesteps ------------------------------------------------------------------------


def test_v_target_formula():
    sched = training_scheduler(ZT)
    gen = torch.Generator().manual_seed(2)
    x0, eps = torch.randn(5, 4, 8, 8, generator=gen), torch.randn(5, 4, 8, 8, generator=gen)
    t = torch.tensor([0, 1, 500, 998, 999])
    ab = torch.from_numpy(ref_alphabar(True))[t].float().view(-1, 1, 1, 1)
    expected = ab.sqrt() * eps - (1 - ab).sqrt() * x0
    assert torch.allclose(training_target(sched, x0, eps, t), expected, rtol=1e-4, atol=1e-5)
    # at the terminal step v = -x0 exactly: the model must predict the data from pure noise
    assert torch.equal(training_target(sched, x0, eps, t)[4], -x0[4])


def test_epsilon_target_is_the_noise():
    cfg = DiffusionConfig(prediction_type=PredictionType.EPSILON)
    x0, eps = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    assert training_target(training_scheduler(cfg), x0, eps, torch.tensor([3, 999])) is eps


def test_timesteps_cover_the_inclusive_range():
    gen = torch.Generator().manual_seed(0)
    t = sample_timesteps(200_000, T, gen)
    assert t.dtype == torch.int64 and t.shape == (200_000,)
    assert t.min().item() == 0 and t.max().item() == 999  # the terminal step is trained
    counts = torch.bincount(t, minlength=T).float()
    assert counts.shape == (T,) and counts.min() > 100  # roughly uniform: expected 200 each
    again = sample_timesteps(200_000, T, torch.Generator().manual_seed(0))
    assert torch.equal(t, again)
