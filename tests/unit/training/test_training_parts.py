"""The pieces of training that need no cluster: the step learns, batching, checkpoints, logging."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from components.config import Config, Precision
from components.diffusion.conditioning import drop_captions, dropout_uses_zeros, encode_text
from components.diffusion.loss import (
    Batch,
    LossSpec,
    NoiseDraw,
    diffusion_loss,
    effective_precision,
    native_bf16,
    prediction_error,
)
from components.diffusion.schedule import training_scheduler
from components.diffusion.sdxl import attention_kind
from components.diffusion.tiny import build_tiny
from components.training.batches import bucket_batches, skip
from components.training.checkpointing import (
    COMPLETE,
    IncompleteCheckpointError,
    TrainState,
    load_checkpoint,
    save_checkpoint,
)
from components.training.loop import build_trainee, graph_breaks, step_generator
from components.training.validation import VAL_BUCKETS, bucket_of, selection_weights
from tests.fixtures.processes import REPO, subprocess_env


def _batch(n=2, size=64):
    g = torch.Generator().manual_seed(0)
    return Batch(
        pixels=torch.rand(n, 3, size, size, generator=g) * 2 - 1,
        captions=["a dark room", "a bright field"][:n],
        original_size=torch.tensor([[size * 2, size * 2]] * n, dtype=torch.float32),
        crop_top_left=torch.zeros(n, 2),
        target_size=torch.tensor([[size, size]] * n, dtype=torch.float32),
    )


def test_overfitting_a_fixed_batch_drives_the_loss_down():
    cfg = Config()
    parts = build_tiny(cfg.model.tiny)
    spec = LossSpec(training_scheduler(cfg.diffusion), cfg.diffusion, Precision.FP32)
    batch = _batch(size=32)
    opt = torch.optim.AdamW(parts.unet.parameters(), lr=3e-3)
    t = torch.tensor([300, 700])

    def loss_at_fixed_noise():
        return diffusion_loss(parts, parts.unet, batch, spec, NoiseDraw(torch.Generator().manual_seed(1), timesteps=t))

    first = loss_at_fixed_noise().item()
    for _ in range(25):
        loss = loss_at_fixed_noise()
        opt.zero_grad()
        loss.backward()
        opt.step()
    last = loss_at_fixed_noise().item()
    assert last < 0.5 * first, (first, last)


def test_bf16_step_has_finite_gradients_at_the_terminal_step():
    cfg = Config()
    parts = build_tiny(cfg.model.tiny)
    spec = LossSpec(training_scheduler(cfg.diffusion), cfg.diffusion, Precision.BF16)
    draw = NoiseDraw(torch.Generator().manual_seed(0), timesteps=torch.tensor([999, 999]))
    loss = diffusion_loss(parts, parts.unet, _batch(size=32), spec, draw)
    loss.backward()
    assert torch.isfinite(loss)
    assert loss.item() > 0  # terminus policy: weight 1.0 at SNR = 0, so t = 999 is trained
    assert all(torch.isfinite(p.grad).all() for p in parts.unet.parameters() if p.grad is not None)


def test_batches_never_mix_buckets_and_keep_order():
    rows = [{"bucket": b, "i": i} for i, b in enumerate("AABABBBAAB")]
    batches = list(bucket_batches(rows, 2))
    assert all(len({r["bucket"] for r in batch}) == 1 for batch in batches)
    # 8 (A) and 9 (B) wait for partners
    assert [[r["i"] for r in b] for b in batches] == [[0, 1], [2, 4], [5, 6], [3, 7]]


def test_skip_replays_the_same_stream_from_a_position():
    batches = [[i] for i in range(6)]
    assert list(skip(iter(batches), 4)) == [[4], [5]]
    assert list(skip(iter(batches), 10)) == []


def test_noise_streams_differ_by_rank_and_repeat_on_resume():
    a = torch.randn(4, generator=step_generator(0, 0, 5, 0))
    b = torch.randn(4, generator=step_generator(0, 1, 5, 0))
    again = torch.randn(4, generator=step_generator(0, 0, 5, 0))
    assert not torch.equal(a, b)
    assert torch.equal(a, again)


def test_checkpoint_round_trip_and_incomplete_is_refused(tmp_path):
    cfg = Config()
    unet = build_tiny(cfg.model.tiny).unet
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5)
    unet(torch.zeros(1, 4, 8, 8), 10, encoder_hidden_states=torch.zeros(1, 77, 64),
         added_cond_kwargs={"text_embeds": torch.zeros(1, 32), "time_ids": torch.zeros(1, 6)}).sample.sum().backward()
    opt.step()
    sched.step()
    save_checkpoint(tmp_path / "c", unet, opt, sched, TrainState(step=7, epoch=1, batches_in_epoch=3))

    other = build_tiny(cfg.model.tiny.model_copy(update={"seed": 5})).unet
    opt2 = torch.optim.AdamW(other.parameters(), lr=1e-3)
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: 0.5)
    state = load_checkpoint(tmp_path / "c", other, opt2, sched2)
    assert state == TrainState(step=7, epoch=1, batches_in_epoch=3)
    for (k, v), (_, w) in zip(unet.state_dict().items(), other.state_dict().items(), strict=True):
        assert torch.equal(v, w), k
    assert sched2.last_epoch == 1
    assert opt2.state_dict()["state"].keys() == opt.state_dict()["state"].keys()

    (tmp_path / "c" / COMPLETE).unlink()  # as if the writer died before finishing
    try:
        load_checkpoint(tmp_path / "c", other)
    except IncompleteCheckpointError as err:
        assert "incomplete" in str(err)
    else:
        raise AssertionError("an incomplete checkpoint was loaded")


def test_precision_policy_falls_back_to_fp32_where_bf16_is_emulated():
    """AVX2 kernels emulate bf16 (about ten times slower than fp32): the run trains in fp32 there. The
    same machine forced to AVX2 kernels (ATEN_CPU_CAPABILITY) shows the fallback; fp16 never runs on CPU."""
    cpu = torch.device("cpu")
    assert effective_precision(Precision.FP32, cpu) is Precision.FP32
    assert effective_precision(Precision.FP16, cpu) is Precision.FP32
    expected = Precision.BF16 if native_bf16(cpu) else Precision.FP32
    assert effective_precision(Precision.BF16, cpu) is expected
    code = ("import torch; from components.diffusion.loss import effective_precision; "
            "from components.config import Precision; print(effective_precision(Precision.BF16, torch.device('cpu')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env=subprocess_env(ATEN_CPU_CAPABILITY="avx2"))
    assert out.stdout.strip() == "fp32", out.stderr[-2000:]


def test_selection_weights_keep_the_terminal_step_below_thirty_percent():
    """``val_loss`` ranks checkpoints: under the recipe's own weights t = 999 carries ~41 % of it (the
    sharp edge); the default bucket average gives no timestep more than 1/8, the paper's weights none."""
    cfg = Config()
    ts = cfg.train.val_timesteps
    assert {bucket_of(t) for t in ts} == set(VAL_BUCKETS)  # every bucket is measured
    for metric in ("bucket_mse", "paper", "recipe"):
        weights = selection_weights(ts, metric, cfg.diffusion)
        assert sum(weights.values()) == pytest.approx(1.0) and set(weights) == set(ts)
    assert selection_weights(ts, "bucket_mse", cfg.diffusion)[999] == pytest.approx(1 / 8)  # < 0.3
    assert selection_weights(ts, "paper", cfg.diffusion)[999] == 0.0
    old = selection_weights([100, 300, 500, 700, 900, 999], "recipe", cfg.diffusion)
    assert old[999] == pytest.approx(0.41, abs=0.01)  # the figure: why the default changed


def test_caption_dropout_conventions():
    """``zeros``: dropped samples get all-zero embeddings; ``empty_prompt``: the encoded empty prompt (and
    the loss zeroes their time ids); ``auto`` follows the base model's ``force_zeros_for_empty_prompt``."""
    embeds, pooled = torch.ones(64, 77, 8), torch.ones(64, 4)
    empty = (torch.full((1, 77, 8), 3.0), torch.full((1, 4), 5.0))
    z_e, z_p, keep = drop_captions(embeds, pooled, 0.5, torch.Generator().manual_seed(0))
    e_e, e_p, keep_2 = drop_captions(embeds, pooled, 0.5, torch.Generator().manual_seed(0), empty)
    assert torch.equal(keep, keep_2) and 0 < int((~keep).sum()) < 64
    assert torch.all(z_e[~keep] == 0) and torch.all(z_p[~keep] == 0) and torch.all(z_e[keep] == 1)
    assert torch.all(e_e[~keep] == 3) and torch.all(e_p[~keep] == 5) and torch.all(e_e[keep] == 1)
    assert dropout_uses_zeros("auto", True) and not dropout_uses_zeros("auto", False)
    assert dropout_uses_zeros("zeros", False) and not dropout_uses_zeros("empty_prompt", True)


def test_empty_prompt_dropout_changes_the_loss_and_zeroes_time_ids():
    cfg = Config()
    parts = build_tiny(cfg.model.tiny)
    sched = training_scheduler(cfg.diffusion)
    batch = _batch(size=32)
    seen = []
    hook = parts.unet.register_forward_pre_hook(
        lambda _m, _a, kw: seen.append(kw["added_cond_kwargs"]["time_ids"].clone()), with_kwargs=True)
    draw = lambda: NoiseDraw(torch.Generator().manual_seed(0), timesteps=torch.tensor([500, 500]))  # noqa: E731
    with torch.no_grad():
        empty = encode_text(parts, [""], "cpu")
        zeros, _ = prediction_error(parts, parts.unet, batch, LossSpec(sched, cfg.diffusion, caption_dropout=1.0),
                                    draw())
        prompt, _ = prediction_error(parts, parts.unet, batch,
                                     LossSpec(sched, cfg.diffusion, caption_dropout=1.0, empty=empty), draw())
    hook.remove()
    assert not torch.allclose(zeros, prompt)  # the two conventions condition the UNet differently
    assert torch.count_nonzero(seen[0]) > 0 and torch.count_nonzero(seen[1]) == 0  # every sample dropped


def test_a_compiled_unet_takes_the_same_step_as_the_eager_one():
    """train.compile compiles in place (the module keeps its type and parameters); forward and backward
    match eager and the UNet is one graph per call."""


    cfg = Config().model_copy(update={"train": Config().train.model_copy(update={
        "compile": True, "compile_backend": "aot_eager", "precision": Precision.FP32})})
    eager = build_trainee(cfg.model_copy(update={"train": cfg.train.model_copy(update={"compile": False})}),
                          torch.device("cpu"), 1, 10)
    compiled = build_trainee(cfg, torch.device("cpu"), 1, 10)
    assert compiled.model is compiled.unet and type(compiled.unet) is type(eager.unet)
    assert compiled.unet._compiled_call_impl is not None and eager.unet._compiled_call_impl is None
    spec = LossSpec(training_scheduler(cfg.diffusion), cfg.diffusion, Precision.FP32)
    before = graph_breaks()
    losses = []
    for t in (eager, compiled):
        draw = NoiseDraw(torch.Generator().manual_seed(1), timesteps=torch.tensor([300, 999]))
        loss = diffusion_loss(t.parts, t.model, _batch(size=32), spec, draw)
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[1], losses[0])
    for (name, a), b in zip(eager.unet.named_parameters(), compiled.unet.parameters(), strict=True):
        if a.grad is not None:
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert graph_breaks() == before


def test_unet_attention_runs_through_sdpa(monkeypatch):
    parts = build_tiny(Config().model.tiny)
    assert attention_kind(parts.unet) == "sdpa"
    calls, inside = [], []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def counting(*args, **kwargs):
        if inside:  # the text encoders use SDPA too; count the UNet's calls only
            calls.append(args[0].shape)
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    parts.unet.register_forward_pre_hook(lambda *_: inside.append(True))
    parts.unet.register_forward_hook(lambda *_: inside.clear())
    spec = LossSpec(training_scheduler(Config().diffusion), Config().diffusion, Precision.FP32)
    with torch.no_grad():
        diffusion_loss(parts, parts.unet, _batch(size=32), spec, NoiseDraw(torch.Generator().manual_seed(0)))
    assert len(calls) == len(parts.unet.attn_processors)  # one call per attention layer, none elsewhere
