"""Single-file export, proved three ways: vanilla diffusers loads the file back and its models
give the diffusers folder's outputs; a full-size SDXL export (on the meta device) has the original SDXL
base key layout; the schedule markers and the ModelSpec header are there, typed as ComfyUI and A1111
read them."""

from __future__ import annotations

import json
import re
import struct
from collections import Counter
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
    infer_diffusers_model_type,
)
from safetensors import safe_open
from safetensors.torch import load_file

from components.config import Config, load_config
from components.diffusion import single_file as sf
from components.diffusion.schedule import inference_scheduler
from components.diffusion.sdxl import save_pipeline
from components.diffusion.tiny import build_tiny
from components.training.memory.plan import sdxl_models
from tests.fixtures.processes import REPO

MODELS = ("unet", "vae", "text_encoder", "text_encoder_2")


@pytest.fixture(scope="module")
def cfg():
    return load_config(REPO / "flows/configs/tiny.yaml")


@pytest.fixture(scope="module")
def folder(cfg, tmp_path_factory) -> Path:
    """The tiny preset's model saved as the trainer registers it (fp32 plus the fp16 variant)."""
    return save_pipeline(build_tiny(cfg.model.tiny), cfg.diffusion, tmp_path_factory.mktemp("sf") / "pipe",
                         variant="fp16")


def export(folder: Path, path: Path, precision: str = "fp16") -> Path:
    return sf.export_pipeline(folder, path, precision, title="tiny test", date="2024-05-01T00:00:00Z",
                              resolution=(256, 256), license="openrail++", metadata={"terminus.version": "7"})


def outputs(pipe, generator_seed: int = 0) -> dict[str, torch.Tensor]:
    """Each model of ``pipe`` on the same inputs (fp32 compute)."""
    gen = torch.Generator().manual_seed(generator_seed)
    ids = pipe.tokenizer(["a red cube on a table"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        te1 = pipe.text_encoder(ids, output_hidden_states=True)
        te2 = pipe.text_encoder_2(ids, output_hidden_states=True)
        context = torch.cat([te1.hidden_states[-2], te2.hidden_states[-2]], dim=-1)
        latents = torch.randn(1, 4, 32, 32, generator=gen)
        time_ids = torch.tensor([[256.0, 256.0, 0.0, 0.0, 256.0, 256.0]])
        eps = pipe.unet(latents, torch.tensor([999]), encoder_hidden_states=context,
                        added_cond_kwargs={"text_embeds": te2.text_embeds, "time_ids": time_ids}).sample
        image = torch.rand(1, 3, 64, 64, generator=gen) * 2 - 1
        posterior = pipe.vae.encode(image).latent_dist.mean
        decoded = pipe.vae.decode(posterior).sample
    return {"text_encoder": te1.hidden_states[-2], "text_encoder_2": te2.hidden_states[-2],
            "pooled": te2.text_embeds, "unet": eps, "vae.encode": posterior, "vae.decode": decoded}


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_the_file_loads_with_vanilla_from_single_file_and_matches_the_folder(cfg, folder, tmp_path, precision):
    """(a) ``StableDiffusionXLPipeline.from_single_file`` with the folder as its config and the preset's
    scheduler: every weight is the folder's, rounded to the export precision, bit for bit, and every
    model's output on the same inputs is the folder's within that rounding."""
    path = export(folder, tmp_path / "tiny.safetensors", precision)
    dtype = sf.DTYPES[precision]
    loaded = StableDiffusionXLPipeline.from_single_file(
        str(path), config=str(folder), scheduler=inference_scheduler(cfg.diffusion), dtype=torch.float32,
        local_files_only=True)
    reference = StableDiffusionXLPipeline.from_pretrained(str(folder), dtype=torch.float32)
    for name in MODELS:
        ours, theirs = reference.components[name].state_dict(), loaded.components[name].state_dict()
        assert ours.keys() == theirs.keys(), name
        for key, value in ours.items():
            assert torch.equal(value.to(dtype).float(), theirs[key]), f"{name}.{key}"
    sched = loaded.scheduler.config
    assert (sched.prediction_type, sched.timestep_spacing, sched.rescale_betas_zero_snr) == \
        ("v_prediction", "trailing", True)
    # Outputs: the rounding of the weights is the only difference. fp16 keeps 11 significant bits, bf16 8;
    # the error relative to each output's largest value stays within a few units (the decoder's deepest).
    unit = {"fp16": 2.0**-11, "bf16": 2.0**-8}[precision]
    expected, got = outputs(reference), outputs(loaded)
    for key in expected:
        scale = expected[key].abs().max().item()
        error = (expected[key] - got[key]).abs().max().item()
        assert 0 < error <= 16 * unit * scale, (key, error / scale / unit)  # a margin over the few units above


def test_the_file_holds_the_weights_of_the_folder_it_was_exported_from(cfg, folder, tmp_path):
    """A folder with one changed tensor exports to a file where exactly that tensor changed: the
    comparisons above are of real weights, not of defaults both sides share."""
    parts = build_tiny(cfg.model.tiny)
    original = parts.unet.conv_in.weight.detach().clone()
    with torch.no_grad():
        parts.unet.conv_in.weight.add_(1.0)
    other = save_pipeline(parts, cfg.diffusion, tmp_path / "other")
    a = load_file(export(folder, tmp_path / "a.safetensors"))
    b = load_file(export(other, tmp_path / "b.safetensors"))
    key = sf.UNET_PREFIX + "input_blocks.0.0.weight"
    assert torch.equal(a[key], original.half()) and torch.equal(b[key], (original + 1.0).half())
    assert a.keys() == b.keys() and [k for k in a if not torch.equal(a[k], b[k])] == [key]


# --- (b) the full-size SDXL key layout ----------------------------------------------------------

SDXL_BASE_KEYS = {
    sf.UNET_PREFIX: 1680,  # one per tensor of diffusers' SDXL UNet (2,567,463,684 parameters)
    sf.VAE_PREFIX: 248,  # one per tensor of the SDXL VAE
    sf.CLIP_L_PREFIX: 197,  # 12 layers x 16 + embeddings (2) + final norm (2) + position_ids
    sf.CLIP_G_PREFIX: 390,  # 32 layers x 12 (q, k, v fused) + token/positional embeddings, ln_final (2),
    # text_projection, logit_scale
}
"""Keys per module of Stability AI's ``sd_xl_base_1.0.safetensors`` (2515 in all), as docs/interchange.md
derives them."""

COMFY_SDXL = {"model_channels": 320, "context_dim": 2048, "adm_in_channels": 2816, "num_res_blocks": [2, 2, 2],
              "channel_mult": [1, 2, 4], "transformer_depth": [0, 0, 2, 2, 10, 10], "transformer_depth_middle": 10,
              "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10], "use_linear_in_transformer": True}
"""ComfyUI's SDXL UNet config (``comfy/supported_models.py`` ``SDXL.unet_config``, plus what its
``model_detection`` derives for SDXL base): the layout ComfyUI matches a checkpoint's keys against."""


def detect_like_comfy(shapes: dict[str, tuple]) -> dict:
    """The UNet config as ComfyUI's ``model_detection.detect_unet_config`` reads it off the original keys:
    channels of the first convolution, context width of the first cross-attention, the added embedding's
    input width, transformer blocks counted per input, middle and output block."""
    p = sf.UNET_PREFIX

    def depth(block: str) -> int:
        pattern = re.escape(f"{p}{block}.1.transformer_blocks.") + r"(\d+)\."
        return len({int(m[1]) for k in shapes if (m := re.match(pattern, k))})

    inputs = sorted({int(m[1]) for k in shapes if (m := re.match(re.escape(p) + r"input_blocks\.(\d+)\.", k))})
    outputs = sorted({int(m[1]) for k in shapes if (m := re.match(re.escape(p) + r"output_blocks\.(\d+)\.", k))})
    downsamples = [i for i in inputs if f"{p}input_blocks.{i}.0.op.weight" in shapes]
    channels = shapes[f"{p}input_blocks.0.0.weight"][0]
    levels, res, mult, level_res = [], [], [], 0
    for i in inputs[1:]:
        if i in downsamples:
            res.append(level_res)
            level_res = 0
            continue
        level_res += 1
        out_ch = shapes[f"{p}input_blocks.{i}.0.out_layers.3.weight"][0]
        levels.append(depth(f"input_blocks.{i}"))
        if level_res == 1:
            mult.append(out_ch // channels)
    res.append(level_res)
    cross = next(v for k, v in shapes.items() if k.endswith("attn2.to_k.weight"))
    return {
        "model_channels": channels, "context_dim": cross[1], "adm_in_channels": shapes[f"{p}label_emb.0.0.weight"][1],
        "num_res_blocks": res, "channel_mult": mult, "transformer_depth": levels,
        "transformer_depth_middle": depth("middle_block"),
        # ComfyUI's UNet pops its output depths from the end of the list: deepest output block last
        "transformer_depth_output": [depth(f"output_blocks.{i}") for i in reversed(outputs)],
        "use_linear_in_transformer": len(shapes[f"{p}input_blocks.4.1.proj_in.weight"]) == 2,
    }


class Recording(dict):
    """A state dict that remembers which keys a converter read."""

    def __init__(self, *args):
        super().__init__(*args)
        self.read: set[str] = set()

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        self.read.add(key)
        return super().get(key, default)


@pytest.fixture(scope="module")
def sdxl_on_meta():
    return sdxl_models()  # SDXL base's published configs, meta tensors: shapes, no storage


def test_a_full_size_sdxl_export_has_the_original_key_layout(sdxl_on_meta):
    """(b) The export of a full-size SDXL (meta device, seconds): 2515 keys in the four original
    prefixes with SDXL base's per-module counts; ComfyUI's detection reads SDXL's UNet config off them;
    diffusers' own original -> diffusers converters read every key and give back each diffusers model's
    exact key set and shapes; diffusers and A1111 classify the file as SDXL base."""
    m = sdxl_on_meta
    state = sf.to_original(m["unet"], m["vae"], m["text_encoder"], m["text_encoder_2"], torch.float16)
    counts = Counter(next(p for p in SDXL_BASE_KEYS if k.startswith(p)) for k in state)
    assert dict(counts) == SDXL_BASE_KEYS and len(state) == 2515
    assert sum(v.numel() for k, v in state.items() if k.startswith(sf.UNET_PREFIX)) == 2_567_463_684
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    assert detect_like_comfy(shapes) == COMFY_SDXL
    assert infer_diffusers_model_type(state) == "xl_base"
    # A1111's find_checkpoint_config: SDXL when this key is there, not inpainting (4 input channels), and
    # "v" when v_pred is (test_markers_and_metadata_are_typed_as_the_uis_expect)
    assert "conditioner.embedders.1.model.ln_final.weight" in state
    assert shapes[sf.UNET_PREFIX + "input_blocks.0.0.weight"][1] == 4
    # Landmarks of the original layout, with SDXL base's shapes.
    assert shapes[sf.UNET_PREFIX + "output_blocks.2.2.conv.weight"] == (1280, 1280, 3, 3)  # upsampler after attention
    assert shapes[sf.UNET_PREFIX + "output_blocks.5.2.conv.weight"] == (640, 640, 3, 3)
    assert shapes[sf.UNET_PREFIX + "input_blocks.6.0.op.weight"] == (640, 640, 3, 3)
    assert shapes[sf.VAE_PREFIX + "encoder.mid.attn_1.q.weight"] == (512, 512, 1, 1)
    assert shapes[sf.CLIP_G_PREFIX + "text_projection"] == (1280, 1280)
    assert shapes[sf.CLIP_G_PREFIX + "transformer.resblocks.31.attn.in_proj_weight"] == (3840, 1280)
    assert state[sf.CLIP_L_POSITION_IDS].dtype == torch.int64 and shapes[sf.CLIP_L_POSITION_IDS] == (1, 77)

    # diffusers' converters, original -> diffusers, on our file: every key read, every model rebuilt.
    unet_in = Recording({k: v for k, v in state.items() if k.startswith(sf.UNET_PREFIX)})
    unet = convert_ldm_unet_checkpoint(unet_in, m["unet"].config)
    vae_in = Recording({k: v for k, v in state.items() if k.startswith(sf.VAE_PREFIX)})
    vae = convert_ldm_vae_checkpoint(vae_in, m["vae"].config)
    clip_in = Recording({k: v for k, v in state.items() if k.startswith(sf.CLIP_L_PREFIX)})
    clip = {k.removeprefix("text_model."): v for k, v in convert_ldm_clip_checkpoint(clip_in).items()}
    open_in = Recording({k: v for k, v in state.items() if k.startswith(sf.CLIP_G_PREFIX)})
    open_clip = convert_open_clip_checkpoint(m["text_encoder_2"], open_in, prefix=sf.CLIP_G_PREFIX)
    for name, rebuilt, source in (("unet", unet, unet_in), ("vae", vae, vae_in), ("text_encoder", clip, clip_in),
                                  ("text_encoder_2", open_clip, open_in)):
        expected = {k: tuple(v.shape) for k, v in m[name].state_dict().items()}
        if name == "text_encoder":  # the original keeps the position_ids buffer; transformers does not save it
            rebuilt = {k: v for k, v in rebuilt.items() if k != "embeddings.position_ids"}
        assert {k: tuple(v.shape) for k, v in rebuilt.items()} == expected, name
        unread = set(source) - source.read
        assert unread == ({sf.CLIP_G_LOGIT_SCALE} if name == "text_encoder_2" else set()), (name, sorted(unread)[:5])


def test_an_unknown_key_is_refused_not_passed_through(cfg):
    parts = build_tiny(cfg.model.tiny)
    state = dict(parts.unet.state_dict())
    state["down_blocks.0.extra.weight"] = torch.zeros(1)
    with pytest.raises(sf.UnmappedKeyError, match="down_blocks.0.extra.weight"):
        sf.convert_unet(state, parts.unet.config)
    vae = dict(parts.vae.state_dict())
    vae["encoder.mid_block.attentions.0.rotary.weight"] = torch.zeros(1)
    with pytest.raises(sf.UnmappedKeyError, match="rotary"):
        sf.convert_vae(vae, parts.vae.config)


def test_equal_encoder_widths_are_refused(tmp_path):
    """diffusers tells the two encoders of a single file apart by width: a model whose encoders are equally
    wide (the tiny model's defaults) would load back with encoder 1's weights in encoder 2."""
    cfg = Config()
    folder = save_pipeline(build_tiny(cfg.model.tiny), cfg.diffusion, tmp_path / "same")
    with pytest.raises(sf.SingleFileExportError, match="both text encoders are 32 wide"):
        export(folder, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


# --- (c) markers and metadata -------------------------------------------------------------------


def test_markers_and_metadata_are_typed_as_the_uis_expect(folder, tmp_path):
    """(c) ``v_pred`` and ``ztsnr`` are top-level empty float tensors (ComfyUI's and A1111's checks are
    ``"v_pred" in state_dict`` on the loaded file; ComfyUI writes them as ``torch.tensor([])``); the header's
    ``__metadata__`` is a str -> str map with ModelSpec's MUST keys, the SDXL base architecture id, the
    v prediction type, resolution, date and the hash of the tensor bytes."""
    path = export(folder, tmp_path / "tiny.safetensors")
    loaded = load_file(path)
    for key in (sf.V_PRED_KEY, sf.ZTSNR_KEY):
        assert key in loaded and loaded[key].dtype == torch.float32 and loaded[key].shape == (0,)
    header_len = struct.unpack("<Q", path.read_bytes()[:8])[0]
    header = json.loads(path.read_bytes()[8:8 + header_len])
    assert header[sf.V_PRED_KEY] == {"dtype": "F32", "shape": [0],
                                     "data_offsets": header[sf.V_PRED_KEY]["data_offsets"]}
    meta = header["__metadata__"]
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
    with safe_open(str(path), framework="pt") as fh:
        assert fh.metadata() == meta
    assert meta["modelspec.sai_model_spec"] == "1.0.0"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base"
    assert meta["modelspec.implementation"] == "sgm"
    assert meta["modelspec.title"] == "tiny test"
    assert meta["modelspec.prediction_type"] == "v" == meta["modelspec.predict_key"]
    assert meta["modelspec.resolution"] == "256x256"
    assert meta["modelspec.date"] == "2024-05-01T00:00:00Z" and meta["modelspec.license"] == "openrail++"
    assert meta["terminus.version"] == "7"
    assert re.fullmatch(r"0x[0-9a-f]{64}", meta["modelspec.hash_sha256"])
    assert meta["modelspec.hash_sha256"] == sf.data_sha256(path)
    assert header_len % 8 == 0
    floats = {k: v.dtype for k, v in loaded.items() if k not in (sf.V_PRED_KEY, sf.ZTSNR_KEY, sf.CLIP_L_POSITION_IDS)}
    assert set(floats.values()) == {torch.float16}
    assert loaded[sf.CLIP_L_POSITION_IDS].dtype == torch.int64


@pytest.mark.parametrize(("prediction", "zero_snr", "expected"), [
    ("v_prediction", True, {"v_pred", "ztsnr"}), ("v_prediction", False, {"v_pred"}), ("epsilon", False, set()),
])
def test_markers_follow_the_schedule(prediction, zero_snr, expected):
    assert set(sf.schedule_markers(prediction, zero_snr)) == expected
