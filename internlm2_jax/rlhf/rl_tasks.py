"""The actor and critic tasks of PPO / GRPO / RLOO for the one `Trainer` (`internlm2_jax.train.trainer`).

Actor batch: `tokens, action_mask, old_logp, ref_logp, advantages [B, T]`, scalar coefficients `ptx_coef` and
`kl_loss_coef`, and optionally a pretraining batch under `pt_tokens / pt_loss_mask / pt_segment_ids /
pt_positions [Bp, S]` (the ptx loss, the pretraining pipeline's layout). Critic batch: `action_mask, old_values,
returns [B, T]` and either `critic_tokens [B, Lc] + critic_index [B, T]` (the RM's input layout) or `tokens`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp

from internlm2_jax.config import ModelConfig
from internlm2_jax.model import init_params
from internlm2_jax.rlhf.logprobs import policy_logprobs
from internlm2_jax.rlhf.ppo import kl_estimate, masked_mean, policy_loss, value_loss
from internlm2_jax.rlhf.reward_model import init_reward_params
from internlm2_jax.rlhf.rollout import critic_values
from internlm2_jax.train.causal_lm import StepConfig, loss_fn

Params = Any
PT_PREFIX = "pt_"


def pretrain_loss(config: ModelConfig, actor: Params, pt: dict[str, jax.Array], loss_chunk: int = 512) -> jax.Array:
    """Mean next-token loss on a pretraining batch `{"tokens": [B, S], "loss_mask"?, "segment_ids"?, "positions"?}`
    (the causal-LM task's loss, so packed pretraining batches count exactly as in pretraining)."""
    _, sums = loss_fn(config, actor, pt, StepConfig(loss_chunk=loss_chunk))
    return sums["loss_sum"] / jnp.maximum(sums["count"], 1.0)


@dataclasses.dataclass(frozen=True)
class ActorTask:
    """`policy_loss + kl_loss_coef·KL_k3(π‖π_ref) + ptx_coef·pretrain_loss` (weight 1: a mean)."""

    config: ModelConfig
    clip: float = 0.2
    chunk: int = 128
    temperature: float = 1.0
    name: str = "rl_actor"

    def loss(self, actor: Params, frozen: Any, batch: dict, rng: Optional[jax.Array]) -> tuple[jax.Array, dict]:
        mask = batch["action_mask"]
        logp, entropy = policy_logprobs(self.config, actor, batch["tokens"], self.chunk, self.temperature)
        pg, metrics = policy_loss(logp, batch["old_logp"], batch["advantages"], mask, self.clip)
        kl_term = masked_mean(kl_estimate(logp, batch["ref_logp"], "k3"), mask)
        pt = {k[len(PT_PREFIX):]: v for k, v in batch.items() if k.startswith(PT_PREFIX)}
        ptx = pretrain_loss(self.config, actor, pt) if pt else jnp.zeros((), jnp.float32)
        total = pg + batch["kl_loss_coef"] * kl_term + batch["ptx_coef"] * ptx
        return total, {"weight": jnp.ones((), jnp.float32), **metrics, "entropy": masked_mean(entropy, mask),
                       "pretrain_loss": ptx, "kl_loss": kl_term, "actor_loss": total}

    def boxed_params(self, rng: jax.Array) -> Params:
        return init_params(self.config, rng)


@dataclasses.dataclass(frozen=True)
class CriticTask:
    """Clipped value loss of the critic (`{"backbone", "v_head"}`, initialised from the RM) on the returns."""

    config: ModelConfig
    value_clip: float = 0.2
    name: str = "rl_critic"

    def loss(self, critic: Params, frozen: Any, batch: dict, rng: Optional[jax.Array]) -> tuple[jax.Array, dict]:
        values = critic_values(self.config, critic, batch)
        loss, metrics = value_loss(values, batch["old_values"], batch["returns"], batch["action_mask"],
                                   self.value_clip)
        return loss, {"weight": jnp.ones((), jnp.float32), **metrics}

    def boxed_params(self, rng: jax.Array) -> Params:
        return init_reward_params(self.config, rng, boxed=True)
