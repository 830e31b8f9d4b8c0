"""RL algorithms by name: an advantage estimator, whether it needs a critic, how many responses it samples per
prompt and where its KL to the reference goes. Adding one is one file that calls `register` (see `rloo.py`).

An estimator maps `(cfg, scores [B], kl [B, T], stats, mask [B, T])` to `{"advantages": [B, T]}` plus
`"returns"` when it trains a critic; `kl` is the per-token KL estimate (`cfg.kl_estimator`) of the sampled
tokens, `stats` holds `old_logp`, `ref_logp` and (with a critic) `old_values`, all `[B, T]`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax

Estimator = Callable[[Any, jax.Array, jax.Array, dict, jax.Array], dict]


@dataclasses.dataclass(frozen=True)
class Algorithm:
    name: str
    advantages: Estimator
    needs_critic: bool = False
    """Trains a critic (value model) next to the actor; its warm-up (`critic_warmup_iters`) freezes the actor."""
    grouped: bool = False
    """Samples `group_size` responses per prompt (consecutive rows of the batch)."""
    kl_in_loss: bool = False
    """KL to the reference as a k3 term of the actor loss (weight `kl_coef`) instead of a reward penalty."""


_REGISTRY: dict[str, Algorithm] = {}


def register(algo: Algorithm) -> Algorithm:
    """Makes `algo` available as `RLConfig.algo = algo.name`."""
    if algo.name in _REGISTRY:
        raise ValueError(f"RL algorithm {algo.name!r} is already registered")
    _REGISTRY[algo.name] = algo
    return algo


def get_algorithm(name: str) -> Algorithm:
    if name not in _REGISTRY:
        raise ValueError(f"unknown RL algorithm {name!r}; registered: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def samples_per_prompt(algo: Algorithm, group_size: int) -> int:
    return group_size if algo.grouped else 1


from internlm2_jax.rlhf.algorithms import grpo, ppo, rloo  # noqa: E402,F401  (built-ins register themselves)
