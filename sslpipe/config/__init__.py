"""Typed recipes: the core schema every method shares (`core`), YAML loading and `key.sub=value` overrides
(`loading`), and the reading of configs written before the per-method schema (`legacy`). A method's own section is
declared beside its recipe; `sslpipe.recipes.load_config` joins them."""
from sslpipe.config.core import (
    CORE_SECTIONS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    CropsConfig,
    DataConfig,
    EvalConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    Section,
    TrackingConfig,
    TrainConfig,
    run_schema,
)
from sslpipe.config.loading import ConfigError, config_to_dict, save_config

__all__ = ["CORE_SECTIONS", "IMAGENET_MEAN", "IMAGENET_STD", "ConfigError", "CropsConfig", "DataConfig", "EvalConfig",
           "ModelConfig", "OptimConfig", "RunConfig", "Section", "TrackingConfig", "TrainConfig", "config_to_dict",
           "run_schema", "save_config"]
