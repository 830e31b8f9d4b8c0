"""AdamW with warm-up + cosine decay, no decay on norms/biases, global-norm clipping (optax)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import optax


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """The report's pretraining optimizer by default."""

    peak_lr: float = 3e-4
    """Learning rate at the end of warm-up."""
    end_lr_ratio: float = 0.1
    """Final lr as a fraction of peak (cosine decays to 10 % of peak)."""
    warmup_steps: int = 2000
    """Linear warm-up steps from 0."""
    total_steps: int = 100_000
    """Steps over which warm-up + cosine decay run (lr stays at the end value afterwards)."""
    b1: float = 0.9
    """Adam β1."""
    b2: float = 0.95
    """Adam β2."""
    eps: float = 1e-8
    """Adam ε."""
    weight_decay: float = 0.1
    """Decoupled weight decay (not applied to norm scales or biases)."""
    clip_norm: float = 1.0
    """Global gradient-norm clipping threshold (<= 0 disables)."""
    schedule: str = "cosine"
    """`"cosine"` (warm-up + cosine) or `"constant"` (warm-up then flat)."""


def lr_schedule(cfg: OptimizerConfig) -> optax.Schedule:
    """Learning-rate schedule of `cfg`."""
    if cfg.schedule == "constant":
        return optax.join_schedules(
            [optax.linear_schedule(0.0, cfg.peak_lr, max(cfg.warmup_steps, 1)), optax.constant_schedule(cfg.peak_lr)],
            [cfg.warmup_steps])
    if cfg.schedule != "cosine":
        raise ValueError(f"unknown lr schedule {cfg.schedule!r}; expected 'cosine' or 'constant'")
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.peak_lr, warmup_steps=cfg.warmup_steps,
        decay_steps=max(cfg.total_steps, cfg.warmup_steps + 1), end_value=cfg.peak_lr * cfg.end_lr_ratio)


def decay_mask(params: Any) -> Any:
    """True for leaves that get weight decay: everything but norm scales and biases (1-D weights)."""
    def keep(path, x):
        names = [str(getattr(p, "key", getattr(p, "name", ""))) for p in path]
        return not any(n in ("scale", "bias") for n in names)
    return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(cfg: OptimizerConfig) -> optax.GradientTransformation:
    """optax chain: clip_by_global_norm → AdamW(schedule, masked decay)."""
    parts = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm > 0 else []
    parts.append(optax.adamw(lr_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                             weight_decay=cfg.weight_decay, mask=decay_mask))
    return optax.chain(*parts)
