"""GRPO (Shao et al. 2024): group-normalized sequence advantages, no critic; the KL to the reference is a k3 term
of the actor loss."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from internlm2_jax.rlhf.algorithms import Algorithm, register


def group_advantages(scores: jax.Array, group_size: int, eps: float = 1e-6) -> jax.Array:
    """`[B]` scores of `B / group_size` consecutive groups → `(r − mean_g) / (std_g + eps)` `[B]`.

    `std` is the population std within each group (a group with equal rewards gets advantage 0).
    """
    g = scores.astype(jnp.float32).reshape(-1, group_size)
    adv = (g - g.mean(axis=1, keepdims=True)) / (g.std(axis=1, keepdims=True) + eps)
    return adv.reshape(-1)


def token_advantages(seq_adv: jax.Array, mask: jax.Array) -> jax.Array:
    """Broadcasts sequence advantages `[B]` to every action token `[B, T]`."""
    return seq_adv[:, None] * mask.astype(jnp.float32)


def grpo_advantages(cfg: Any, scores: jax.Array, kl: jax.Array, stats: dict, mask: jax.Array) -> dict:
    return {"advantages": token_advantages(group_advantages(scores, cfg.group_size), mask)}


GRPO = register(Algorithm("grpo", grpo_advantages, grouped=True, kl_in_loss=True))
