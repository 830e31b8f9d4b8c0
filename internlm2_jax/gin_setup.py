"""Registers the library's config dataclasses with gin, and parses gin files with clear errors."""

from __future__ import annotations

import os
import re
from typing import Any, Optional, Sequence

import gin

from internlm2_jax.checkpointing import CheckpointConfig
from internlm2_jax.config import ModelConfig, get_preset
from internlm2_jax.errors import ConfigValueError
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


class GinConfigError(ConfigValueError):
    """A gin file or binding could not be applied (typo, unknown name, bad value, missing file)."""


def _one_line(e: Exception, where: str) -> str:
    """gin's multi-line message as one line: the reason, the location, and for a bad literal a hint."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    reason = lines[0] if lines else type(e).__name__
    token = re.search(r"Failed to parse token '([^']*)'", str(e))
    if token:
        reason = f"value {token.group(1)} is not a Python literal (quote strings: '{token.group(1)}')"
    loc = next((ln for ln in lines[1:] if ln.startswith("In file")), "")
    return f"{where}: {reason}" + (f" ({loc})" if loc else "")


def parse_gin(files: Sequence[str], bindings: Sequence[str]) -> None:
    """Parses gin `files` then each of `bindings`; any problem is one `GinConfigError` naming the file and line
    or the binding."""
    for f in files:
        if not os.path.exists(f):
            raise GinConfigError(f"gin file not found: {f}")
    errors = (ValueError, KeyError, NameError, SyntaxError, TypeError)
    try:
        gin.parse_config_files_and_bindings(list(files), [], finalize_config=False)
    except errors as e:
        raise GinConfigError(_one_line(e, "bad gin config")) from None
    for b in bindings:
        try:
            gin.parse_config(b)
        except errors as e:
            raise GinConfigError(_one_line(e, f"bad gin binding {b!r}")) from None


# Numeric bindings checked by name wherever they are bound (None always means "unset"):
# (pattern of the parameter name, type, lower bound, lower bound inclusive, upper bound).
_RULES: tuple[tuple[str, type, float, bool, Optional[float]], ...] = (
    (r"num_steps|iterations|epochs|global_batch_size|batch_size|per_device_batch|seq_len|row_len|token_budget|"
     r"max_pairs|checkpoint_every|log_every|keep_last|max_new_tokens|ppo_epochs|num_minibatches|group_size|"
     r"prompt_len|max_prompt_len|records_per_shard|lora_rank|rank|vocab_size|hidden_size|intermediate_size|"
     r"num_hidden_layers|num_attention_heads|num_key_value_heads|max_position_embeddings|max_nonfinite|"
     r"loss_chunk|logprob_chunk", int, 1, True, None),
    (r"warmup_steps|eval_every|eval_batches|total_steps|keep_every|critic_warmup_iters|seed|synthetic_docs",
     int, 0, True, None),
    (r"peak_lr|actor_lr|critic_lr|lr|learning_rate|rope_theta", float, 0, False, None),
    (r"end_lr_ratio|warmup_ratio|dropout|eval_fraction", float, 0, True, 1),
    (r"top_p", float, 0, False, 1),
    (r"weight_decay|kl_coef|ptx_coef|clip_norm|z_loss|temperature|barrier_weight", float, 0, True, None),
)


def _check(name: str, value: Any) -> Optional[str]:
    """Why `value` is invalid for a parameter called `name`, or None."""
    for pattern, typ, low, inclusive, high in _RULES:
        if not re.fullmatch(pattern, name) or value is None:
            continue
        ok_type = isinstance(value, int) if typ is int else isinstance(value, (int, float))
        if isinstance(value, bool) or not ok_type:
            return f"expected {'an integer' if typ is int else 'a number'}, got {type(value).__name__}"
        bad_low = value < low if inclusive else value <= low
        if bad_low or (high is not None and value > high):
            upper = f" and <= {high}" if high is not None else ""
            return f"must be {'>=' if inclusive else '>'} {low}{upper}"
    return None


def validate_bindings() -> None:
    """Checks every bound numeric value by its parameter name (lr > 0, steps/batches/intervals > 0, ...);
    raises `GinConfigError` naming the binding, e.g. `OptimizerConfig.peak_lr=-1: must be > 0`."""
    for (scope, selector), params in gin.config._CONFIG.items():  # gin has no public iterator over bindings
        short = selector.rsplit(".", 1)[-1]
        where = f"{scope}/{short}" if scope else short
        for name, value in params.items():
            why = _check(name, value)
            if why:
                raise GinConfigError(f"bad value {where}.{name}={value!r}: {why}")
