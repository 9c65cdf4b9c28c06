"""The quality metrics' plumbing, checked against the closed-form definitions on the same injected feature
model: what reaches torchmetrics (uint8 layout, the projected CLIP embeddings, the extractor) gives the
numbers the formulas give. The tiny models are random, so these numbers check code, never quality."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import linalg

from components.evaluation.quality import (
    RANDOM,
    TinyFeatures,
    as_uint8_batch,
    clip_loader,
    clip_score,
    clip_scores,
    distribution_distance,
    feature_file,
    fid_weights_id,
    tiny_clip,
)


def _images(seed: int, n: int, side: int = 48, shift: float = 0.0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    base = rng.random((n, side, side, 3)) * 0.7 + shift
    return as_uint8_batch([img.astype(np.float32) for img in base])


def _frechet(a: np.ndarray, b: np.ndarray) -> float:
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(cov_a @ cov_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))


def _kid(a: np.ndarray, b: np.ndarray) -> float:
    """Unbiased MMD^2 with the cubic polynomial kernel (x.y / d + 1)^3 over the whole sets."""
    d = a.shape[1]

    def k(x, y):
        return (x @ y.T / d + 1) ** 3

    m = len(a)
    kxx, kyy, kxy = k(a, a), k(b, b), k(a, b)
    off = lambda kk: (kk.sum() - np.trace(kk)) / (m * (m - 1))  # noqa: E731
    return float(off(kxx) + off(kyy) - 2 * kxy.mean())


def test_fid_and_kid_match_their_closed_forms_on_the_injected_features():
    real, fake = _images(0, 80), _images(1, 80, shift=0.25)
    with torch.no_grad():
        fr = TinyFeatures()(real).double().numpy()
        ff = TinyFeatures()(fake).double().numpy()
    got, vectors = distribution_distance(real, fake, "tiny", None, kid_subset_size=80)
    assert got["fid"] == pytest.approx(_frechet(fr, ff), rel=1e-3)
    assert got["kid"] == pytest.approx(_kid(fr, ff), rel=1e-3, abs=1e-6)
    np.testing.assert_allclose(vectors["real"], fr, rtol=1e-6)  # the vectors the intervals resample
    np.testing.assert_allclose(vectors["fake"], ff, rtol=1e-6)
    same, _ = distribution_distance(real, real, "tiny", None, kid_subset_size=80)
    assert same["fid"] == pytest.approx(0.0, abs=1e-3) and got["fid"] > 100 * max(same["fid"], 1e-6)


def test_fid_is_nan_below_two_images_on_either_side():
    one, many = _images(0, 1), _images(1, 4)
    figures, vectors = distribution_distance(one, many, "tiny", None, 4)
    assert all(np.isnan(v) for v in figures.values()) and vectors == {}


def test_clip_score_is_the_scaled_cosine_of_the_projected_embeddings():
    images = _images(2, 3, side=40)
    prompts = ["a red bicycle", "a dark forest at night", "a bowl of lemons"]
    loaded: dict = {}
    got = clip_score(images, prompts, "tiny", loaded)
    assert loaded["weights_id"] == RANDOM
    model, processor = tiny_clip()  # the same seed: the same weights torchmetrics was given
    inputs = processor(text=prompts, images=list(images), return_tensors="pt", padding=True)
    with torch.no_grad():
        img = model.visual_projection(model.vision_model(pixel_values=inputs["pixel_values"]).pooler_output)
        txt = model.text_projection(model.text_model(input_ids=inputs["input_ids"],
                                                     attention_mask=inputs["attention_mask"]).pooler_output)
    cos = torch.nn.functional.cosine_similarity(img, txt, dim=-1)
    assert got == pytest.approx(max(float((100 * cos).mean()), 0.0), rel=1e-4, abs=1e-4)  # the mean is floored
    mean, per_image = clip_scores(images, prompts, "tiny")
    assert mean == pytest.approx(got, rel=1e-6)
    assert per_image == pytest.approx((100 * cos).tolist(), rel=1e-4, abs=1e-4)  # each image with its own prompt


def test_weights_ids_say_random_for_tiny_and_hash_a_file(tmp_path):
    assert fid_weights_id("tiny", None) == RANDOM
    assert fid_weights_id("inception", None) == "inception-2015-12-05"
    path = tmp_path / "features.pt"
    torch.jit.trace(TinyFeatures(), _images(3, 2)).save(str(path))
    first = fid_weights_id(str(path), None)
    assert first.startswith("sha256:") and first == fid_weights_id(str(path), None)
    real, fake = _images(0, 16), _images(1, 16, shift=0.25)  # a TorchScript file computes what its module does
    assert distribution_distance(real, fake, str(path), None, 16)[0] == pytest.approx(
        distribution_distance(real, fake, "tiny", None, 16)[0], rel=1e-4)
    loaded: dict = {}
    clip_loader("tiny", loaded)()
    assert loaded == {"weights_id": RANDOM}


def test_a_feature_model_file_on_s3_is_fetched_and_hashed_as_the_local_one(tmp_path, s3_env):
    import boto3

    path = tmp_path / "features.pt"
    torch.jit.trace(TinyFeatures(), _images(3, 2)).save(str(path))
    client = boto3.client("s3", endpoint_url=s3_env)
    client.create_bucket(Bucket="metrics")
    client.upload_file(str(path), "metrics", "fid/features.pt")
    local = feature_file("s3://metrics/fid/features.pt", tmp_path / "cache")
    assert local == str(tmp_path / "cache" / "metrics" / "fid" / "features.pt")
    assert fid_weights_id(local, None) == fid_weights_id(str(path), None)
    assert feature_file("tiny") == "tiny" and feature_file(None) is None and feature_file(str(path)) == str(path)
    with pytest.raises(FileNotFoundError, match="no object s3://metrics/fid/missing.pt"):
        feature_file("s3://metrics/fid/missing.pt", tmp_path / "cache")
