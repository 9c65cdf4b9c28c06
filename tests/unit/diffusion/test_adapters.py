"""Adapters on the tiny UNet: peft builds them, the diffusers-format file loads in vanilla diffusers exactly as in the
platform's loader, the kohya-layout file has the documented keys and loads through diffusers' own kohya converter,
and many adapters on one UNet give each adapter's own output."""

from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import load_file

from components.config import Config
from components.diffusion.adapters import (
    AdapterError,
    AdapterSlots,
    AdapterWeights,
    adapter_state,
    add_adapter,
    peft_config,
    read_adapter,
    save_adapter,
)
from components.diffusion.kohya import export_kohya, metadata, module_name, to_kohya
from components.diffusion.sdxl import save_pipeline
from components.diffusion.tiny import build_tiny

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def unet_output(unet) -> torch.Tensor:
    """The UNet's prediction on fixed inputs of the tiny model's shapes."""
    cfg = unet.config
    gen = torch.Generator().manual_seed(3)
    pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    sample = torch.randn(2, 4, 8, 8, generator=gen)
    text = torch.randn(2, 77, cfg.cross_attention_dim, generator=gen)
    added = {"text_embeds": torch.randn(2, pooled, generator=gen),
             "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)}
    with torch.no_grad():
        return unet(sample, torch.tensor([999, 400]), encoder_hidden_states=text, added_cond_kwargs=added).sample


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    cfg = Config()
    return save_pipeline(build_tiny(cfg.model.tiny), cfg.diffusion, tmp_path_factory.mktemp("base") / "pipeline")


def fresh_unet(base_dir):
    return UNet2DConditionModel.from_pretrained(str(base_dir), subfolder="unet")


def random_adapter(base_dir, method: str, seed: int, rank: int = 4, alpha: float = 8.0) -> AdapterWeights:
    """An adapter as training leaves it, with every tensor random (a fresh one changes nothing: LoRA's B and
    LoKr's w1 start at zero)."""
    unet = fresh_unet(base_dir)
    config = peft_config(method, rank, alpha, 0.0, TARGETS)
    params = add_adapter(unet, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return AdapterWeights(adapter_state(unet), config)


def with_platform_loader(base_dir, weights: AdapterWeights) -> torch.Tensor:
    unet = fresh_unet(base_dir)
    slots = AdapterSlots(unet)
    slots.ensure("a", weights)
    with slots.running("a"):
        return unet_output(unet)


def test_peft_builds_the_adapter_and_refuses_unknown_targets(base_dir):
    unet = fresh_unet(base_dir)
    before = unet_output(unet)
    params = add_adapter(unet, peft_config("lora", 4, None, 0.1, TARGETS))
    assert params and all(p.requires_grad for p in params)
    assert not any(p.requires_grad for n, p in unet.named_parameters() if "lora_" not in n)
    assert torch.equal(unet_output(unet.eval()), before)  # B = 0: training starts at the base exactly
    with pytest.raises((AdapterError, ValueError)):
        add_adapter(fresh_unet(base_dir), peft_config("lora", 4, None, 0.0, ["no_such_module"]))


def test_diffusers_file_loads_in_vanilla_diffusers_and_changes_the_unet_as_the_platform_loader(base_dir, tmp_path):
    weights = random_adapter(base_dir, "lora", seed=1)
    folder = tmp_path / "adapter"
    save_adapter(folder, weights.state, weights.config)
    pipe = StableDiffusionXLPipeline.from_pretrained(str(base_dir))
    base = unet_output(pipe.unet)
    pipe.load_lora_weights(str(folder))  # vanilla diffusers: alpha comes from the file's header
    vanilla = unet_output(pipe.unet) - base
    platform = with_platform_loader(base_dir, read_adapter(folder)) - base
    assert vanilla.abs().max() > 1e-2
    torch.testing.assert_close(vanilla, platform, atol=1e-5, rtol=1e-4)


def test_a_file_that_is_not_the_adapter_it_claims_is_refused(base_dir, tmp_path):
    weights = random_adapter(base_dir, "lora", seed=1)
    state = dict(weights.state)
    state.pop(sorted(state)[0])
    with pytest.raises(AdapterError, match="1 missing"):
        with_platform_loader(base_dir, AdapterWeights(state, weights.config))
    with pytest.raises(AdapterError, match="no adapter file"):
        read_adapter(tmp_path)


def kohya_meta(weights: AdapterWeights) -> dict[str, str]:
    return metadata(weights, title="style v1", date="2026-01-01T00:00:00Z", resolution=(64, 64),
                    prediction_type="v_prediction", base_name="terminus-tiny-base v1",
                    provenance={"terminus.base_model_uri": "models:/terminus-tiny-base/1"})


def test_kohya_file_has_the_documented_keys_and_loads_through_diffusers_kohya_converter(base_dir, tmp_path):
    weights = random_adapter(base_dir, "lora", seed=2, rank=4, alpha=2.0)
    unet_config = dict(fresh_unet(base_dir).config)
    path = export_kohya(weights, unet_config, tmp_path / "style.safetensors", kohya_meta(weights), precision="fp32")
    keys = set(load_file(path))
    modules = {k.rsplit(".", 2)[0] for k in weights.state}  # peft: <module>.lora_A.weight
    expected = {f"{module_name(m, unet_config)}.{s}" for m in modules for s in ("lora_down.weight", "lora_up.weight",
                                                                               "alpha")}
    assert keys == expected
    # The SGM (original UNet) module path kohya, ComfyUI and A1111 use: the tiny UNet's second level is input_blocks 3.
    assert "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert "lora_unet_output_blocks_0_1_transformer_blocks_0_attn2_to_out_0.alpha" in keys
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == "4"
    assert meta["ss_network_alpha"] == "2.0" and meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["modelspec.prediction_type"] == "v" and meta["modelspec.hash_sha256"].startswith("0x")
    assert meta["terminus.base_model_uri"] == "models:/terminus-tiny-base/1"

    pipe = StableDiffusionXLPipeline.from_pretrained(str(base_dir))
    base = unet_output(pipe.unet)
    pipe.load_lora_weights(load_file(path))  # a kohya state dict: diffusers converts the keys and the alphas
    kohya = unet_output(pipe.unet) - base
    platform = with_platform_loader(base_dir, weights) - base
    assert kohya.abs().max() > 1e-2
    torch.testing.assert_close(kohya, platform, atol=1e-5, rtol=1e-4)


def test_lokr_round_trips_loads_in_vanilla_diffusers_and_has_the_lycoris_keys(base_dir, tmp_path):
    weights = random_adapter(base_dir, "lokr", seed=3, rank=4, alpha=2.0)
    folder = tmp_path / "lokr"
    save_adapter(folder, weights.state, weights.config)
    back = read_adapter(folder)
    assert back.method == "lokr" and back.config.alpha == 2.0 and set(back.state) == set(weights.state)
    base = unet_output(fresh_unet(base_dir))
    change = with_platform_loader(base_dir, back) - base
    assert change.abs().max() > 1e-3
    torch.testing.assert_close(change, with_platform_loader(base_dir, weights) - base)
    # Vanilla diffusers reads the LoKr file through the UNet's own loader (its SDXL pipeline loader takes LoRA only).
    unet = fresh_unet(base_dir)
    unet.load_lora_adapter(str(folder), prefix="unet", weight_name="pytorch_lora_weights.safetensors")
    torch.testing.assert_close(unet_output(unet) - base, change, atol=1e-5, rtol=1e-4)
    keys = to_kohya(weights, dict(fresh_unet(base_dir).config))
    suffixes = {k.rsplit(".", 1)[1] for k in keys}
    assert suffixes <= {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "alpha"}
    assert all(k.startswith("lora_unet_") for k in keys)


def test_two_adapters_on_one_unet_give_each_its_own_output(base_dir):
    one, two = random_adapter(base_dir, "lora", seed=4), random_adapter(base_dir, "lokr", seed=5)
    alone = [with_platform_loader(base_dir, w) for w in (one, two)]
    unet = fresh_unet(base_dir)
    base = unet_output(unet)
    slots = AdapterSlots(unet)
    slots.ensure("one", one)
    slots.ensure("two", two)
    for _ in range(2):  # switching back and forth
        for name, expected in zip(("one", "two"), alone, strict=True):
            with slots.running(name):
                torch.testing.assert_close(unet_output(unet), expected)
        with slots.running(None):
            torch.testing.assert_close(unet_output(unet), base)
    slots.drop("one")
    with slots.running("two"):
        torch.testing.assert_close(unet_output(unet), alone[1])
    with pytest.raises(AdapterError, match="not attached"):
        with slots.running("one"):
            pass
