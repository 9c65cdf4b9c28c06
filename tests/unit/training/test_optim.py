"""Optimizers and the warmup + cosine LR schedule (components/training/optim.py)."""

from __future__ import annotations

import builtins
import importlib.util
import math

import pytest
import torch
from transformers.optimization import Adafactor

from components.config import LRConfig, OptimizerName, TrainConfig
from components.training.optim import OptimizerUnavailable, build_lr_scheduler, build_optimizer

CARD_LR = LRConfig(max=8e-7, min=4e-7, warmup_steps=10)


def _params():
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(8, 4)), torch.nn.Parameter(torch.randn(4))]


def _lrs(total: int, lr: LRConfig = CARD_LR) -> list[float]:
    """The LR each optimizer step 0..total-1 runs with (read before the scheduler steps)."""
    opt = torch.optim.SGD(_params(), lr=1.0)
    sched = build_lr_scheduler(opt, lr, total)
    seen = []
    for _ in range(total):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return seen


def test_schedule_landmarks():
    total = 111  # 10 warmup steps, then 100 cosine intervals from step 10 to step 110
    lrs = _lrs(total)
    assert lrs[0] == pytest.approx(8e-7 / 11, rel=1e-9)  # warmup starts above 0: no wasted step
    assert lrs[9] == pytest.approx(8e-7 * 10 / 11, rel=1e-9)
    assert lrs[10] == pytest.approx(8e-7, rel=1e-9)  # warmup end = lr.max
    assert lrs[60] == pytest.approx((8e-7 + 4e-7) / 2, rel=1e-9)  # cosine midpoint
    assert lrs[-1] == pytest.approx(4e-7, rel=1e-9)  # last step = lr.min, not 0
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11], strict=True))
    assert all(a >= b for a, b in zip(lrs[10:-1], lrs[11:], strict=True))
    assert min(lrs) > 0


def test_schedule_matches_closed_form_and_floors_after_the_end():
    lr = LRConfig(max=1e-3, min=1e-4, warmup_steps=0)
    lrs = _lrs(21, lr)
    for step, value in enumerate(lrs):
        expected = 1e-4 + (1e-3 - 1e-4) * 0.5 * (1 + math.cos(math.pi * step / 20))
        assert value == pytest.approx(expected, rel=1e-9)
    opt = torch.optim.SGD(_params(), lr=1.0)
    sched = build_lr_scheduler(opt, lr, 5)
    for _ in range(20):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-4, rel=1e-9)


def test_state_dict_round_trip():
    model = torch.nn.Linear(4, 2)
    cfg = TrainConfig(lr=LRConfig(max=1e-3, min=1e-4, warmup_steps=3))
    opt = build_optimizer(model.parameters(), cfg, "cpu")
    sched = build_lr_scheduler(opt, cfg.lr, 20)
    for _ in range(7):
        model(torch.randn(3, 4)).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    saved_opt, saved_sched = opt.state_dict(), sched.state_dict()

    model_2 = torch.nn.Linear(4, 2)
    model_2.load_state_dict(model.state_dict())
    opt_2 = build_optimizer(model_2.parameters(), cfg, "cpu")
    sched_2 = build_lr_scheduler(opt_2, cfg.lr, 20)
    opt_2.load_state_dict(saved_opt)
    sched_2.load_state_dict(saved_sched)
    assert sched_2.last_epoch == 7
    assert opt_2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    assert torch.equal(opt_2.state[opt_2.param_groups[0]["params"][0]]["exp_avg"],
                       opt.state[opt.param_groups[0]["params"][0]]["exp_avg"])
    for _ in range(5):  # the resumed run continues exactly where the first one would
        sched.step()
        sched_2.step()
        assert opt_2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


@pytest.mark.parametrize(
    ("lr", "total", "match"),
    [
        # The config refuses these at load (tests/unit/test_config.py); the scheduler checks again for
        # callers that build an LRConfig without validation.
        (LRConfig.model_construct(max=1e-4, min=1e-3, warmup_steps=0), 10, "lr.min <= lr.max"),
        (LRConfig.model_construct(max=1e-4, min=0.0, warmup_steps=0), 10, "lr.min <= lr.max"),
        (LRConfig(max=1e-4, min=1e-5), 0, "total_steps"),
        (LRConfig.model_construct(max=1e-4, min=1e-5, warmup_steps=-1), 10, "warmup_steps"),
    ],
)
def test_bad_schedule_is_rejected(lr, total, match):
    with pytest.raises(ValueError, match=match):
        build_lr_scheduler(torch.optim.SGD(_params(), lr=1.0), lr, total)


def test_adamw_on_cpu_is_fused_and_uses_the_config():
    cfg = TrainConfig(optimizer=OptimizerName.ADAMW, weight_decay=0.05)
    opt = build_optimizer(_params(), cfg, torch.device("cpu"))
    assert isinstance(opt, torch.optim.AdamW)
    group = opt.param_groups[0]
    assert group["lr"] == 8e-7 and group["weight_decay"] == 0.05 and group["fused"]


def test_fused_adamw_takes_the_same_steps_as_the_per_tensor_one():
    torch.manual_seed(0)
    start = [torch.randn(64, 32), torch.randn(32)]
    grads = [[torch.randn_like(p) for p in start] for _ in range(5)]
    cfg = TrainConfig(optimizer=OptimizerName.ADAMW, lr=LRConfig(max=1e-2, min=1e-3))
    finals = []
    for fused in (True, False):
        params = [torch.nn.Parameter(p.clone()) for p in start]
        opt = build_optimizer(params, cfg.model_copy(update={"fused_optimizer": fused}), "cpu")
        assert bool(opt.param_groups[0]["fused"]) is fused
        for step in grads:
            for p, g in zip(params, step, strict=True):
                p.grad = g.clone()
            opt.step()
        finals.append(params)
    for fused, plain, original in zip(*finals, start, strict=True):
        assert not torch.allclose(fused, original)  # the steps moved the weights
        torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="fused AdamW on CUDA needs CUDA")
def test_adamw_on_cuda_is_fused():
    params = [torch.nn.Parameter(torch.randn(4, device="cuda"))]
    opt = build_optimizer(params, TrainConfig(optimizer=OptimizerName.ADAMW), "cuda")
    assert opt.param_groups[0]["fused"]


def test_adafactor_uses_the_external_lr():
    param = torch.nn.Parameter(torch.ones(16, 8))
    cfg = TrainConfig(optimizer=OptimizerName.ADAFACTOR, weight_decay=0.0, lr=LRConfig(max=1e-2, min=1e-3))
    opt = build_optimizer([param], cfg, "cpu")
    assert isinstance(opt, Adafactor)
    group = opt.param_groups[0]
    assert group["lr"] == 1e-2 and not group["relative_step"] and not group["scale_parameter"]
    sched = build_lr_scheduler(opt, cfg.lr, 10)
    param.sum().backward()
    opt.step()
    sched.step()
    # First Adafactor step: the update is lr * (g / rms(g)) clipped to RMS 1, so every entry moves by lr.
    assert torch.allclose(param.detach(), torch.full_like(param, 1 - 1e-2), rtol=0, atol=1e-6)
    assert opt.param_groups[0]["lr"] < 1e-2  # the scheduler drives the lr Adafactor applies


def test_adamw8bit_without_cuda_is_a_one_line_error():
    cfg = TrainConfig(optimizer=OptimizerName.ADAMW_8BIT)
    with pytest.raises(OptimizerUnavailable, match="needs a CUDA device") as info:
        build_optimizer(_params(), cfg, "cpu")
    assert "\n" not in str(info.value)


def test_adamw8bit_without_bitsandbytes_message(monkeypatch):
    """The missing-package branch on any machine: CUDA claimed, the import made to fail."""
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "bitsandbytes":
            raise ImportError("No module named 'bitsandbytes'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(OptimizerUnavailable, match="pip install bitsandbytes") as info:
        build_optimizer([], TrainConfig(optimizer=OptimizerName.ADAMW_8BIT), torch.device("cuda"))
    assert "\n" not in str(info.value)


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("bitsandbytes") is None,
    reason="needs CUDA and bitsandbytes",
)
def test_adamw8bit_on_cuda():
    params = [torch.nn.Parameter(torch.randn(4096, device="cuda"))]
    opt = build_optimizer(params, TrainConfig(optimizer=OptimizerName.ADAMW_8BIT), "cuda")
    params[0].sum().backward()
    opt.step()
    assert type(opt).__name__ == "AdamW8bit"


def test_cosine_with_restarts_returns_to_the_peak_every_period():
    lr = LRConfig(max=8e-7, min=4e-7, warmup_steps=2, schedule="cosine_restarts", restart_every=4)
    opt = torch.optim.SGD(_params(), lr=1.0)
    sched = build_lr_scheduler(opt, lr, total_steps=20)
    seen = []
    for _ in range(14):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen[2] == pytest.approx(8e-7) and seen[5] == pytest.approx(4e-7)  # one cycle: peak to floor
    assert seen[6] == pytest.approx(8e-7) and seen[10] == pytest.approx(8e-7)  # restarts every 4 steps
    assert seen[3] > seen[4] > seen[5]
    with pytest.raises(ValueError, match="restart_every"):
        LRConfig(schedule="cosine_restarts")
