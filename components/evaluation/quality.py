"""Image-quality metrics of a generator: CLIP score (prompt adherence) and FID / KID (distance of the
generated images' feature distribution from the held-out images'), computed by torchmetrics.

The metric models are configured (``evaluate.clip_model``, ``evaluate.fid_features``). With real weights
-- ``openai/clip-vit-large-patch14`` for CLIP score, torchmetrics' InceptionV3 (``inception``) for FID and
KID -- the numbers are the published ones. Machines without network (the tests, the demo) use ``tiny``
models: randomly initialised from a fixed seed, built offline, shaped like the real ones, run through the
same metric code. A random network's numbers are not a quality signal: each metric records which weights
computed it (``weights_id``: ``random`` for the tiny models, else a content hash), and the promotion gate
refuses to decide on a random one; docs/recipe.md says which weights to use.
"""

from __future__ import annotations

import hashlib
import importlib.util
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance
from torchmetrics.multimodal import CLIPScore
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

from components.diffusion.tiny import tiny_tokenizer
from components.storage import fetch_object, fetch_prefix

RANDOM = "random"
"""The ``weights_id`` of a metric computed by a randomly initialised feature model."""
TINY_SEED = 0
TINY_FEATURE_SIDE = 64  # the tiny extractor looks at 64 x 64 images, as Inception looks at 299 x 299


def tiny_clip():
    """A randomly initialised CLIP (text and vision towers, projection) and its processor, built offline."""


    torch.manual_seed(TINY_SEED)
    config = CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                         vocab_size=1000, max_position_embeddings=77, bos_token_id=512, eos_token_id=513,
                         pad_token_id=513),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tiny_tokenizer(),
    )
    return CLIPModel(config).eval(), processor


class ProjectedFeatures(nn.Module):
    """A CLIPModel whose ``get_*_features`` return the projected embeddings as tensors: transformers 5
    returns model outputs there (the embeddings in ``pooler_output``), torchmetrics expects tensors."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.config = model.config

    @staticmethod
    def _tensor(out) -> torch.Tensor:
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def get_image_features(self, *args, **kwargs) -> torch.Tensor:
        return self._tensor(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs) -> torch.Tensor:
        return self._tensor(self.model.get_text_features(*args, **kwargs))


def module_sha256(module: nn.Module) -> str:
    """sha256 over every tensor of ``module``'s state dict: name, dtype, shape and bytes, in key order."""
    digest = hashlib.sha256()
    for key, value in sorted(module.state_dict().items()):
        value = value.detach().contiguous().cpu()
        digest.update(f"{key}|{value.dtype}|{tuple(value.shape)}".encode())
        digest.update(memoryview(value.view(torch.uint8).numpy()) if value.numel() else b"")
    return digest.hexdigest()


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while chunk := fh.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def clip_location(name: str, cache_dir: str | Path | None = None) -> str:
    """Where ``CLIPModel.from_pretrained`` reads ``evaluate.clip_model`` from: an ``s3://`` prefix is fetched
    into ``cache_dir`` first (``components.storage.fetch_prefix``); a local folder or a hub id as given."""
    if name.startswith("s3://"):
        if cache_dir is None:
            raise ValueError(f"evaluate.clip_model {name}: an s3:// prefix needs a cache folder")
        return str(fetch_prefix(name, cache_dir))
    return name


def feature_file(name: str | None, cache_dir: str | Path | None = None) -> str | None:
    """A local path for an FID/KID feature model file (``evaluate.fid_features`` as a TorchScript file,
    ``evaluate.fid_weights``): an ``s3://`` object is fetched into ``cache_dir`` first
    (``components.storage.fetch_object``, reused while its ETag holds); ``tiny``, ``inception``, a local path
    or None as given."""
    if name is None or not name.startswith("s3://"):
        return name

    if cache_dir is None:
        raise ValueError(f"{name}: an s3:// object needs a cache folder")
    return str(fetch_object(name, cache_dir))


def clip_loader(name: str, loaded: dict | None = None):
    """What torchmetrics' CLIPScore takes as ``model_name_or_path``: a callable giving (model, processor).
    ``loaded`` (if given) gets ``weights_id``: ``random`` for ``tiny``, else ``sha256:`` of the weights."""

    def load():
        if name == "tiny":
            model, processor = tiny_clip()
            weights_id = RANDOM
        else:
            model, processor = CLIPModel.from_pretrained(name).eval(), CLIPProcessor.from_pretrained(name)
            weights_id = f"sha256:{module_sha256(model)[:16]}"
        if loaded is not None:
            loaded["weights_id"] = weights_id
        return ProjectedFeatures(model), processor

    return load


def fid_weights_id(features: str, weights: str | None) -> str:
    """Which weights compute FID and KID: ``random`` (``tiny``), torch-fidelity's InceptionV3 (with the hash of
    an offline weights file when one is given), or the hash of a TorchScript file."""
    if features == "tiny":
        return RANDOM
    if features == "inception":
        return f"inception-2015-12-05:sha256:{file_sha256(weights)[:16]}" if weights else "inception-2015-12-05"
    return f"sha256:{file_sha256(features)[:16]}"


class TinyFeatures(nn.Module):
    """A small conv net, randomly initialised from a fixed seed: uint8 images (N, 3, H, W) -> (N, 64)
    features, the interface torchmetrics' FID and KID expect of a custom extractor."""

    num_features = 64

    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(TINY_SEED)
        self.net = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(32, self.num_features, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        with torch.no_grad():
            for p in self.net.parameters():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
        self.eval().requires_grad_(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255.0  # (N, 3, H, W)
        x = nn.functional.interpolate(x, size=(TINY_FEATURE_SIDE, TINY_FEATURE_SIDE), mode="bilinear",
                                      antialias=True, align_corners=False)
        return self.net(x)


def feature_extractor(name: str) -> int | nn.Module:
    """torchmetrics' ``feature`` argument: 2048 (its InceptionV3) for ``inception``, a TorchScript module
    from a path, or ``TinyFeatures``."""
    if name == "inception":
        if importlib.util.find_spec("torch_fidelity") is None:
            raise RuntimeError("evaluate.fid_features=inception needs torch-fidelity: pip install '.[inception]' "
                               "(and evaluate.fid_weights for an offline weights file)")
        return 2048
    if name == "tiny":
        return TinyFeatures()
    return torch.jit.load(name, map_location="cpu").eval()


def as_uint8_batch(images: list[np.ndarray], side: int | None = None) -> torch.Tensor:
    """Float (H, W, 3) images in [0, 1] or uint8 ones -> uint8 (N, 3, H, W), resized (LANCZOS) to ``side``."""

    out = []
    for image in images:
        arr = image if image.dtype == np.uint8 else (np.nan_to_num(image).clip(0, 1) * 255).round().astype(np.uint8)
        if side is not None and arr.shape[:2] != (side, side):
            arr = np.asarray(Image.fromarray(arr).resize((side, side), Image.Resampling.LANCZOS))
        out.append(torch.from_numpy(np.array(arr)).permute(2, 0, 1))  # a writable copy (PIL's arrays are read-only)
    return torch.stack(out)


def clip_scores(images: torch.Tensor, prompts: list[str], model: str,
                loaded: dict | None = None) -> tuple[float, list[float]]:
    """CLIP score of uint8 images (N, 3, H, W) and their prompts: torchmetrics' figure (the mean of
    100 x cosine similarity, floored at 0 as a mean) and each image's own 100 x cosine (what pairs with
    another model's image of the same prompt and seed). ``loaded`` gets the model's ``weights_id``
    (``clip_loader``)."""

    metric = CLIPScore(model_name_or_path=clip_loader(model, loaded))
    per_image = []
    for image, prompt in zip(images, prompts, strict=True):  # one model load; the running sum gives each score
        before = float(metric.score)
        metric.update([image], [prompt])
        per_image.append(float(metric.score) - before)
    return float(metric.compute()), per_image


def clip_score(images: torch.Tensor, prompts: list[str], model: str, loaded: dict | None = None) -> float:
    """torchmetrics' CLIP score of the images and prompts (``clip_scores``' first figure)."""
    return clip_scores(images, prompts, model, loaded)[0]


def distribution_distance(real: torch.Tensor, fake: torch.Tensor, features: str, weights: str | None,
                          kid_subset_size: int) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """FID and KID (mean) between two sets of uint8 images (N, 3, H, W), NaN when a set has fewer than 2; and
    each set's feature vectors (``real``, ``fake``: float64 (N, d)) from the same extractor, what the paired
    intervals resample (``distances.py``)."""
    if len(real) < 2 or len(fake) < 2:
        return {"fid": float("nan"), "kid": float("nan")}, {}

    extractor = feature_extractor(features)
    kwargs = {"feature_extractor_weights_path": weights} if weights and features == "inception" else {}
    fid = FrechetInceptionDistance(feature=extractor, **kwargs)
    with warnings.catch_warnings():  # that KID keeps every feature vector: these two sets, the evaluation's own
        warnings.filterwarnings("ignore", message=".*will save all extracted features in buffer")
        kid = KernelInceptionDistance(feature=extractor, subset_size=min(kid_subset_size, len(real), len(fake)),
                                      **kwargs)
    for metric in (fid, kid):
        metric.update(real, real=True)
        metric.update(fake, real=False)
    kid_mean, _ = kid.compute()
    with torch.no_grad():  # the extractor FID ran, on the images it saw
        vectors = {side: fid.inception(images).double().reshape(len(images), -1).numpy()
                   for side, images in (("real", real), ("fake", fake))}
    return {"fid": float(fid.compute()), "kid": float(kid_mean)}, vectors
