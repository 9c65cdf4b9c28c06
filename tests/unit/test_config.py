"""The typed config tree: strict keys, typed overrides, one-line errors, and the presets."""

from __future__ import annotations

from pathlib import Path

import pytest

from components.config import (
    Config,
    ConfigError,
    OptimizerName,
    Precision,
    PredictionType,
    TerminalPolicy,
    load_config,
)

CONFIGS = Path(__file__).resolve().parents[2] / "flows" / "configs"


def one_line_error(path=None, overrides=None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    message = str(info.value)
    assert "\n" not in message and message
    return message


@pytest.mark.parametrize(
    "yaml_text",
    [
        "nonsense: 1\n",
        "train:\n  batch_sise: 4\n",
        "train:\n  lr:\n    maximum: 1.0e-5\n",
        "curate:\n  filters:\n    max_luminence: 0.5\n",
    ],
)
def test_unknown_keys_are_rejected_at_any_depth(tmp_path, yaml_text):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    message = one_line_error(path)
    assert "invalid config at" in message and "extra" in message.lower()


def test_unknown_key_in_an_override_is_rejected():
    message = one_line_error(overrides=["train.lr.maxx=1"])
    assert "train.lr.maxx" in message


def test_overrides_are_typed():
    cfg = load_config(
        CONFIGS / "tiny.yaml",
        [
            "train.batch_size=7",
            "train.lr.max=1e-5",
            "diffusion.zero_terminal_snr=false",
            "diffusion.min_snr_gamma=null",
            "diffusion.prediction_type=epsilon",
            "diffusion.terminal_policy=paper",
            "train.val_timesteps=[0, 999]",
            "model.source=ptx0/terminus-xl-gamma-v1",
        ],
    )
    assert cfg.train.batch_size == 7 and isinstance(cfg.train.batch_size, int)
    assert cfg.train.lr.max == 1e-5 and isinstance(cfg.train.lr.max, float)
    assert cfg.diffusion.zero_terminal_snr is False
    assert cfg.diffusion.min_snr_gamma is None
    assert cfg.diffusion.prediction_type is PredictionType.EPSILON
    assert cfg.diffusion.terminal_policy is TerminalPolicy.PAPER
    assert cfg.train.val_timesteps == [0, 999]
    assert cfg.model.source == "ptx0/terminus-xl-gamma-v1"
    assert cfg.train.lr.min == 3.0e-5  # untouched siblings keep the preset's value


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["train.batch_size=many"], "train.batch_size"),
        (["diffusion.prediction_type=x0"], "diffusion.prediction_type"),
        (["train.caption_dropout=1.5"], "train.caption_dropout"),
        (["inference.steps=0"], "inference.steps"),
        (["no_equals_sign"], "key.path=value"),
        (["seed.inner=1"], "seed is not a section"),
        (["curate.buckets.min_side=100"], "multiples of step"),
    ],
)
def test_bad_values_give_one_line_errors(overrides, fragment):
    assert fragment in one_line_error(CONFIGS / "tiny.yaml", overrides)


def test_missing_file_and_non_mapping(tmp_path):
    assert "not found" in one_line_error(tmp_path / "absent.yaml")
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    assert "mapping" in one_line_error(listing)


def test_assignment_is_validated():
    cfg = Config()
    with pytest.raises(ValueError):
        cfg.train.batch_size = "many"


@pytest.mark.parametrize("name", ["tiny.yaml", "terminus_v2.yaml"])
def test_presets_load(name):
    cfg = load_config(CONFIGS / name)
    assert isinstance(cfg, Config)
    assert cfg.digest() == load_config(CONFIGS / name).digest()  # stable lineage hash


def test_terminus_preset_matches_the_card():
    cfg = load_config(CONFIGS / "terminus_v2.yaml")
    train, diffusion = cfg.train, cfg.diffusion
    assert cfg.model.source == "ptx0/terminus-xl-gamma-v1"  # fine-tuned from v1
    assert train.batch_size == 24 and train.grad_accum == 15 and train.num_workers == 1
    assert train.effective_batch == 360
    assert train.lr.max == 8e-7 and train.lr.min == 4e-7
    assert train.epochs == 60
    assert train.precision is Precision.BF16
    assert diffusion.prediction_type is PredictionType.V
    assert diffusion.zero_terminal_snr is True
    assert diffusion.min_snr_gamma == 5.0
    assert diffusion.terminal_policy is TerminalPolicy.TERMINUS
    assert train.caption_dropout == 0.1
    assert train.optimizer is OptimizerName.ADAMW_8BIT and train.grad_checkpointing
    assert cfg.inference.guidance_rescale == 0.7
    assert cfg.curate.filters.max_luminance == 0.5 and cfg.curate.buckets.area == 1024 * 1024
    assert cfg.diffusion.beta_start == 0.00085 and cfg.diffusion.beta_end == 0.012
    assert cfg.diffusion.beta_schedule == "scaled_linear" and cfg.diffusion.num_train_timesteps == 1000


def test_tiny_preset_keeps_the_recipe():
    cfg = load_config(CONFIGS / "tiny.yaml")
    assert cfg.model.source == "tiny"
    assert cfg.diffusion == load_config(CONFIGS / "terminus_v2.yaml").diffusion
