"""Registers the library's config dataclasses with gin, and parses gin files with clear errors."""

from __future__ import annotations

import os
from typing import Any, Sequence

import gin

from internlm2_jax.checkpointing import CheckpointConfig
from internlm2_jax.config import ModelConfig, get_preset
from internlm2_jax.input import InputConfig
from internlm2_jax.sharding import MeshConfig
from internlm2_jax.train.optimizer import OptimizerConfig
from internlm2_jax.train.causal_lm import StepConfig

for _cls in (InputConfig, OptimizerConfig, MeshConfig, StepConfig, CheckpointConfig):
    gin.external_configurable(_cls)


@gin.configurable
def model_config(preset: str = gin.REQUIRED, **overrides: Any) -> ModelConfig:
    """A `ModelConfig` from a preset name plus field overrides (e.g. `model_config.dtype = 'float32'`)."""
    return get_preset(preset, **overrides)


@gin.configurable
def hf_model_config(path: str = gin.REQUIRED, **overrides: Any) -> ModelConfig:
    """A `ModelConfig` read from an HF `config.json` (folder or file) plus overrides."""
    return ModelConfig.from_hf(path, **overrides)


class GinConfigError(ValueError):
    """A gin file or binding could not be applied (typo, unknown name, missing file)."""


def parse_gin(files: Sequence[str], bindings: Sequence[str]) -> None:
    """Parses gin `files` then `bindings`; any problem is one `GinConfigError` naming it."""
    for f in files:
        if not os.path.exists(f):
            raise GinConfigError(f"gin file not found: {f}")
    try:
        gin.parse_config_files_and_bindings(list(files), list(bindings), finalize_config=False)
    except (ValueError, KeyError, NameError, SyntaxError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise GinConfigError(f"bad gin config: {first}") from None
