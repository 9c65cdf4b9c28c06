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
    ServeConfig,
    TerminalPolicy,
    in_ray_package_copy,
    load_config,
    reference,
    reference_text,
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
            "train.lr.max=1e-3",
            "diffusion.zero_terminal_snr=false",
            "diffusion.min_snr_gamma=null",
            "diffusion.prediction_type=epsilon",
            "diffusion.terminal_policy=paper",
            "train.val_timesteps=[0, 999]",
            "model.source=ptx0/terminus-xl-gamma-v1",
        ],
    )
    assert cfg.train.batch_size == 7 and isinstance(cfg.train.batch_size, int)
    assert cfg.train.lr.max == 1e-3 and isinstance(cfg.train.lr.max, float)
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
    assert cfg.curate.buckets.area == 1024 * 1024
    # The card's two sources: LAION-HD's URL parquet with EXIF, watermark and luminance filters; the
    # Midjourney dataset on the Hub with none.
    laion, mj = cfg.curate.resolved_sources()
    assert (laion.name, laion.kind, mj.name, mj.kind) == ("laion-hd", "urls", "mj-general", "huggingface")
    assert mj.location == "hf://datasets/ptx0/mj-general"
    assert laion.filters.require_exif and laion.filters.max_luminance == 0.5 and laion.filters.max_watermark <= 0.7
    assert not (mj.filters.require_exif or mj.filters.drop_edited or mj.filters.dedupe)
    assert mj.filters.max_watermark is mj.filters.max_luminance is mj.filters.max_punsafe is None
    assert cfg.diffusion.beta_start == 0.00085 and cfg.diffusion.beta_end == 0.012
    assert cfg.diffusion.beta_schedule == "scaled_linear" and cfg.diffusion.num_train_timesteps == 1000


def test_tiny_preset_keeps_the_recipe():
    cfg = load_config(CONFIGS / "tiny.yaml")
    assert cfg.model.source == "tiny"
    assert cfg.diffusion == load_config(CONFIGS / "terminus_v2.yaml").diffusion


# --- ranges, typed overrides, paths, the reference -----------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["train.batch_size=0"], "train.batch_size"),
        (["train.grad_accum=-1"], "train.grad_accum"),
        (["train.max_steps=0"], "train.max_steps"),
        (["train.lr.max=0"], "train.lr.max"),
        (["train.lr.min=-1e-6"], "train.lr.min"),
        (["train.lr.min=1e-3", "train.lr.max=1e-4"], "lr.min 0.001 is above lr.max"),
        (["serve.max_n=0"], "serve.max_n"),
        (["serve.max_side=0"], "serve.max_side"),
        (["serve.min_side=512", "serve.max_side=256"], "min_side 512 is above max_side 256"),
        (["curate.buckets.min_side=1024", "curate.buckets.max_side=512"], "min_side 1024 is above max_side 512"),
        (["curate.filters.min_aspect=3", "curate.filters.max_aspect=2"], "min_aspect 3.0 is above max_aspect"),
        (["train.val_timesteps=[0, 1000]"], "train.val_timesteps [1000] outside 0..999"),
    ],
)
def test_ranges_and_orderings_are_one_line_errors(overrides, fragment):
    assert fragment in one_line_error(CONFIGS / "tiny.yaml", overrides)


@pytest.mark.parametrize("overrides", [["serve.api_key_env="], ["serve.api_key_env= "], ["serve.api_key_env=''"],
                                       ["serve.api_key_env=MY KEY"], ["train.epochs="]])
def test_an_empty_or_blank_value_is_refused_not_read_as_null(overrides):
    """``--set serve.api_key_env=$UNSET`` used to clear the field: the endpoint served without a key and
    said nothing. An empty value is now an error (null clears a field), and so is an api_key_env that
    cannot name a variable."""
    message = one_line_error(CONFIGS / "tiny.yaml", overrides)
    assert "no value" in message or "not the name of an environment variable" in message, message


def test_an_empty_api_key_env_in_a_preset_is_refused(tmp_path):
    """``api_key_env: ""`` in a preset (or ``{"api_key_env": ""}`` from Python) turned auth off silently."""
    preset = tmp_path / "p.yaml"
    preset.write_text('serve:\n  api_key_env: ""\n')
    assert "not the name of an environment variable" in one_line_error(preset)
    with pytest.raises(ValueError):
        ServeConfig(api_key_env="")
    assert Config(serve={"api_key_env": "TERMINUS_API_KEY"}).serve.api_key_env == "TERMINUS_API_KEY"


def test_a_refused_yaml_tag_is_a_config_error(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("name: !!python/object/apply:os.system ['echo pwned']\n")
    assert "not a valid preset" in one_line_error(path)


def test_overrides_take_the_type_of_their_field():
    cfg = load_config(CONFIGS / "tiny.yaml", ["train.run_name=20241130", "tracking.experiment=off",
                                              "serve.api_key_env=null", "curate.cache_dtype=float32"])
    assert cfg.train.run_name == "20241130" and cfg.tracking.experiment == "off"
    assert cfg.serve.api_key_env is None and cfg.curate.cache_dtype == "float32"
    assert load_config(CONFIGS / "tiny.yaml", ["tracking.experiment=yes"]).tracking.experiment == "yes"


def test_preset_paths_resolve_from_the_repository_not_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a flow run from another folder
    cfg = load_config(CONFIGS / "tiny.yaml")
    repo = CONFIGS.parents[1]
    assert cfg.curate.source == str(repo / "data/demo/manifest.jsonl")
    assert cfg.state_dir == str(repo / ".state")
    # --set paths are the user's, relative to where they run the flow
    assert load_config(CONFIGS / "tiny.yaml", ["state_dir=here"]).state_dir == str(tmp_path / "here")


def test_a_preset_outside_the_repository_resolves_against_its_own_folder(tmp_path, monkeypatch):
    preset = tmp_path / "mine" / "p.yaml"
    preset.parent.mkdir()
    preset.write_text("curate:\n  source: photos/\nstate_dir: st\n")
    monkeypatch.chdir(tmp_path)
    cfg = load_config(preset)
    assert cfg.curate.source == str(preset.parent / "photos") and cfg.state_dir == str(preset.parent / "st")


def test_state_locations_derive_from_state_dir(tmp_path):
    cfg = load_config(CONFIGS / "tiny.yaml", [f"state_dir={tmp_path}"])
    assert cfg.curate.output == f"{tmp_path}/datasets/tiny" == cfg.train.data
    assert cfg.train.storage_path == f"{tmp_path}/ray_results"
    explicit = load_config(CONFIGS / "tiny.yaml", [f"state_dir={tmp_path}", "train.storage_path=s3://b/ckpt"])
    assert explicit.train.storage_path == "s3://b/ckpt" and explicit.curate.output == f"{tmp_path}/datasets/tiny"


def test_relative_state_paths_are_refused_inside_a_ray_job_copy(tmp_path, monkeypatch):
    copy = tmp_path / "session_1" / "runtime_resources" / "working_dir_files" / "_ray_pkg_abc"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    assert in_ray_package_copy(copy) and not in_ray_package_copy(tmp_path)
    assert "relative inside a Ray job" in one_line_error(None, ["state_dir=.state"])
    assert "train.storage_path" in one_line_error(None, [f"state_dir={tmp_path}", "train.storage_path=rel"])
    assert load_config(None, [f"state_dir={tmp_path}"]).state_dir == str(tmp_path)


def test_a_relative_state_path_outside_a_job_is_made_absolute_where_the_command_runs(tmp_path, monkeypatch):
    """The one rule for relative paths: resolved when the config loads (``--set`` against the working
    directory), so every Ray worker gets an absolute path; only a job's deleted copy refuses them."""
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["state_dir=runs/here", "train.storage_path=ckpt"])
    assert cfg.state_dir == str(tmp_path / "runs/here") and cfg.train.storage_path == str(tmp_path / "ckpt")
    assert cfg.train.data == str(tmp_path / "runs/here/datasets/tiny")


def test_every_key_is_documented_in_the_reference():
    rows = reference()
    undocumented = [r["key"] for r in rows if not r["doc"].strip()]
    assert undocumented == []
    assert len([r for r in rows if not r.get("section")]) > 100
    text = reference_text(load_config(CONFIGS / "terminus_v2.yaml"))
    assert 'train.batch_size = 24  (int)' in text and "[train.lr]" in text


def test_one_source_of_a_list_is_set_by_its_name():
    cfg = load_config(CONFIGS / "terminus_v2.yaml", ["curate.sources.laion-hd.location=s3://mine/laion/",
                                                      "curate.sources.mj-general.filters.dedupe=true",
                                                      "curate.sources.mj-general.caption_column=TEXT"])
    laion, mj = cfg.curate.sources
    assert laion.location == "s3://mine/laion/" and laion.filters.require_exif  # the rest of it stays
    assert mj.filters.dedupe and mj.caption_column == "TEXT" and mj.location == "hf://datasets/ptx0/mj-general"
    text = reference_text(cfg)  # --print-config names each entry as --set does
    assert 'curate.sources.laion-hd.location = "s3://mine/laion/"  (str)' in text
    assert "curate.sources.mj-general.filters.dedupe = true  (bool)" in text
    with pytest.raises(ConfigError, match="has no entry named 'laion' \\(names: laion-hd, mj-general\\)"):
        load_config(CONFIGS / "terminus_v2.yaml", ["curate.sources.laion.location=/x"])
    with pytest.raises(ConfigError, match="curate.sources.mj-general.repeats"):
        load_config(CONFIGS / "terminus_v2.yaml", ["curate.sources.mj-general.repeats=-1"])


def test_a_named_source_on_a_one_source_preset_says_to_set_the_shorthand():
    """The tiny preset lists no ``curate.sources``: naming one is refused with the keys that set its source,
    not with a type error about a list."""
    with pytest.raises(ConfigError) as err:
        load_config(CONFIGS / "tiny.yaml", ["curate.sources.laion-hd.location=/x"])
    message = str(err.value)
    assert "no entry named 'laion-hd'" in message and "--set curate.source=" in message
    assert "valid list" not in message and "\n" not in message
    assert load_config(CONFIGS / "tiny.yaml", ["curate.source=/x"]).curate.resolved_sources()[0].location == "/x"
