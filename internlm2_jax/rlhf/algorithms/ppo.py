"""PPO (the report's RLHF): per-token rewards = sequence score at the last action − kl_coef·KL, GAE advantages
(whitened by default) and returns for the critic."""

from __future__ import annotations

from typing import Any

import jax

from internlm2_jax.rlhf.algorithms import Algorithm, register
from internlm2_jax.rlhf.gae import gae
from internlm2_jax.rlhf.ppo import token_rewards, whiten


def ppo_advantages(cfg: Any, scores: jax.Array, kl: jax.Array, stats: dict, mask: jax.Array) -> dict:
    rewards = token_rewards(scores, kl, mask, cfg.kl_coef)
    adv, returns = gae(rewards, stats["old_values"], mask, gamma=cfg.gamma, lam=cfg.lam)
    if cfg.whiten_advantages:
        adv = whiten(adv, mask)
    return {"advantages": adv, "returns": returns}


PPO = register(Algorithm("ppo", ppo_advantages, needs_critic=True))
