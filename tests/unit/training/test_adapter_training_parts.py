"""The training side of an adapter run, without Ray: the UNet frozen in the compute dtype with peft's adapter in
fp32 beside it, one optimizer step moving the adapter only, checkpoints of the adapter alone (and refused across
methods), and the merged adapter equal to the attached one."""

from __future__ import annotations

import pytest
import torch

from components.config import RecurringError, load_config
from components.diffusion.adapters import AdapterSlots, AdapterWeights, adapter_state, fuse
from components.diffusion.tiny import build_tiny
from components.training.checkpointing import (
    TrainState,
    load_adapter_weights,
    load_checkpoint,
    save_checkpoint,
    write_complete,
)
from components.training.loop import ADAPTER_NAME, prepare_unet
from components.training.optim import build_optimizer
from tests.fixtures.processes import REPO
from tests.unit.diffusion.test_adapters import unet_output


def train_cfg(*extra: str):
    return load_config(REPO / "flows/configs/tiny.yaml",
                       ["train.precision=bf16", "train.optimizer=adamw", *extra]).train


def one_step(unet, trainable, train) -> torch.optim.Optimizer:
    optimizer = build_optimizer(trainable, train, "cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = unet_output_with_grad(unet).float().pow(2).mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return optimizer


def unet_output_with_grad(unet) -> torch.Tensor:
    cfg = unet.config
    gen = torch.Generator().manual_seed(0)
    pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    added = {"text_embeds": torch.randn(1, pooled, generator=gen), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    return unet(torch.randn(1, 4, 8, 8, generator=gen), torch.tensor([500]),
                encoder_hidden_states=torch.randn(1, 77, cfg.cross_attention_dim, generator=gen),
                added_cond_kwargs=added).sample


@pytest.mark.parametrize("method", ["lora", "lokr"])
def test_an_adapter_trains_beside_the_frozen_bf16_unet_and_checkpoints_alone(method, tmp_path):
    train = train_cfg(f"train.method={method}", "train.adapter.rank=4")
    unet = build_tiny(load_config(REPO / "flows/configs/tiny.yaml").model.tiny).unet
    frozen_before = {n: p.detach().clone() for n, p in unet.named_parameters()}
    trainable = prepare_unet(unet, train, torch.device("cpu"))
    marker = "lora_" if method == "lora" else "lokr_"
    assert trainable and all(p.dtype == torch.float32 and p.requires_grad for p in trainable)
    frozen = [(n, p) for n, p in unet.named_parameters() if not p.requires_grad]
    assert frozen and all(p.dtype == torch.bfloat16 and marker not in n for n, p in frozen)
    assert {n for n, p in unet.named_parameters() if p.requires_grad} == {
        n for n, _ in unet.named_parameters() if marker in n}

    optimizer = one_step(unet, trainable, train)
    assert len(optimizer.state) == len(trainable)  # moments for the adapter's tensors only
    for name, param in unet.named_parameters():  # the frozen weights did not move (beyond the bf16 cast)
        base = name.replace(".base_layer", "")
        if not param.requires_grad and base in frozen_before:
            assert torch.equal(param, frozen_before[base].to(torch.bfloat16))

    ckpt = tmp_path / "ckpt"
    save_checkpoint(ckpt, unet, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0),
                    TrainState(step=1), adapter=ADAPTER_NAME)
    write_complete(ckpt)
    assert (ckpt / "adapter.safetensors").exists() and not (ckpt / "unet.safetensors").exists()
    saved = load_adapter_weights(ckpt)
    assert saved.method == method and set(saved.state) == set(adapter_state(unet))

    # Resume: a fresh run of the same method loads the adapter and its optimizer state exactly.
    other = build_tiny(load_config(REPO / "flows/configs/tiny.yaml").model.tiny).unet
    other_params = prepare_unet(other, train, torch.device("cpu"))
    other_opt = build_optimizer(other_params, train, "cpu")
    state = load_checkpoint(ckpt, other, other_opt, adapter=ADAPTER_NAME)
    assert state.step == 1
    for key, value in adapter_state(unet).items():
        assert torch.equal(adapter_state(other)[key], value)
    # ... and a full fine-tune under the same run name is refused in one line.
    with pytest.raises(RecurringError, match="holds an adapter"):
        load_checkpoint(ckpt, build_tiny(load_config(REPO / "flows/configs/tiny.yaml").model.tiny).unet)


def test_a_merged_adapter_equals_the_attached_one():
    """Evaluation merges the adapter into the base's UNet (``fuse``); serving attaches it: the same model."""
    tiny = load_config(REPO / "flows/configs/tiny.yaml").model.tiny
    unet = build_tiny(tiny).unet
    trainable = prepare_unet(unet, train_cfg("train.method=lora", "train.precision=fp32"), torch.device("cpu"))
    with torch.no_grad():
        for i, p in enumerate(trainable):
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) * 0.1)
    weights = AdapterWeights(adapter_state(unet), unet.peft_config[ADAPTER_NAME])
    attached = build_tiny(tiny).unet
    slots = AdapterSlots(attached)
    slots.ensure("a", weights)
    with slots.running("a"):
        expected = unet_output(attached)
    merged = fuse(build_tiny(tiny).unet, weights)
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(unet_output(merged), expected, atol=1e-5, rtol=1e-4)
    assert (expected - unet_output(build_tiny(tiny).unet)).abs().max() > 1e-3
