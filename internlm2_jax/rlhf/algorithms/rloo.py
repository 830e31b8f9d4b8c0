"""RLOO (REINFORCE leave-one-out; Ahmadian et al. 2024): `k = group_size` responses per prompt, each response's
reward `r_i = score_i − kl_coef·Σ_t KL_t` baselined by the mean reward of the other `k − 1` responses to the same
prompt, `A_i = r_i − mean_{j≠i} r_j = k/(k−1)·(r_i − mean_j r_j)`, broadcast to every action token. No critic."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from internlm2_jax.rlhf.algorithms import Algorithm, register


def rloo_advantages(cfg: Any, scores: jax.Array, kl: jax.Array, stats: dict, mask: jax.Array) -> dict:
    k = cfg.group_size
    if k < 2:
        raise ValueError("RLOO needs group_size >= 2 (a leave-one-out baseline)")
    rewards = (scores.astype(jnp.float32) - cfg.kl_coef * jnp.sum(kl * mask, axis=1)).reshape(-1, k)
    baseline = (rewards.sum(axis=1, keepdims=True) - rewards) / (k - 1)
    adv = (rewards - baseline).reshape(-1)
    return {"advantages": adv[:, None] * mask.astype(jnp.float32)}


RLOO = register(Algorithm("rloo", rloo_advantages, grouped=True))
