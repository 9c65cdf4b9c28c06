"""The one typed configuration tree shared by every flow.

Presets are YAML files under ``flows/configs/`` validated on load; unknown keys are rejected everywhere, so a
YAML that names a parameter which no longer exists fails at once. ``schema`` holds every section and field
with its default and documentation; ``loading`` reads presets and ``--set`` overrides and resolves paths;
``errors`` the error types. Everything is importable from here (``from components.config import Config``).
"""

from __future__ import annotations

from components.config.errors import (  # noqa: F401
    ConfigError,
    RecurringError,
    find_cause,
)
from components.config.loading import (  # noqa: F401
    INPUT_PATHS,
    SOURCE_PATHS,
    STATE_PATHS,
    coerce_override,
    in_ray_package_copy,
    load_config,
    reference,
    reference_text,
)
from components.config.schema import (  # noqa: F401
    ADAPTER_TARGETS,
    DEFAULT_SOURCE,
    ENV_NAME,
    GATE_DIRECTIONS,
    MIN_SAMPLES,
    REPO,
    SHORTHAND,
    SOURCE_NAME,
    AdapterConfig,
    BucketConfig,
    CaptionerConfig,
    Config,
    CropMode,
    CurateConfig,
    DiffusionConfig,
    DownloadConfig,
    EvaluateConfig,
    FilterConfig,
    InferenceConfig,
    LRConfig,
    LuminancePolicy,
    MissingCaption,
    ModelConfig,
    OptimizerName,
    Parallel,
    Precision,
    PredictionType,
    PublishConfig,
    ServeConfig,
    SourceConfig,
    SourceKind,
    Strict,
    TerminalPolicy,
    TinyModelConfig,
    TrackingConfig,
    TrainConfig,
    TrainMethod,
)
