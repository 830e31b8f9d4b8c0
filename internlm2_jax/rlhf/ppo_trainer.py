"""PPO / GRPO trainer: rollout → scoring → advantages → clipped updates, with critic warm-up and a
pretraining (ptx) loss on the actor. All four models live on a `jax.sharding.Mesh` (default: one device):
params and optimizer states carry the shardings of `internlm2_jax.rlhf.mesh`, and the update steps are
jitted with explicit `in_shardings` / `out_shardings` (batches split over data × fsdp)."""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Iterator, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from internlm2_jax.config import ModelConfig
from internlm2_jax.model import hidden_states
from internlm2_jax.rlhf import grpo
from internlm2_jax.rlhf.gae import gae
from internlm2_jax.rlhf.mesh import (actor_shardings, batch_spec, critic_shardings, default_mesh, mesh_context,
                                     opt_shardings, place, put_batch)
from internlm2_jax.rlhf.ppo import kl_estimate, masked_mean, policy_loss, token_rewards, value_loss, whiten
from internlm2_jax.rlhf.rollout import PromptItem, RewardFn, assemble, critic_values, policy_logprobs, rollout_stats
from internlm2_jax.sft.generate import generate
from internlm2_jax.sharding import replicated
from internlm2_jax.train.loss import chunked_cross_entropy, next_token_targets
from internlm2_jax.train.step import finite_update

Params = Any


@dataclasses.dataclass(frozen=True)
class PPOConfig:
    """Hyper-parameters (defaults: the report's PPO recipe where it gives one)."""

    algo: str = "ppo"                 # "ppo" (GAE + critic) or "grpo" (group-normalized, no critic)
    batch_size: int = 16              # prompts per iteration (GRPO: × group_size responses)
    group_size: int = 4               # GRPO responses per prompt
    max_prompt_len: int = 64
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 0.9
    top_k: int = 0
    kl_coef: float = 0.01             # PPO: per-token KL penalty in the reward; GRPO: KL term in the loss
    kl_estimator: str = "k1"          # "k1" | "k2" | "k3" (GRPO uses k3 in the loss)
    gamma: float = 1.0
    lam: float = 0.99
    clip: float = 0.2
    value_clip: float = 0.2
    ppo_epochs: int = 1
    num_minibatches: int = 1
    critic_warmup_iters: int = 50     # first iterations update only the critic (actor frozen)
    ptx_coef: float = 0.5             # weight of the next-token loss on pretraining batches
    whiten_advantages: bool = True
    logprob_chunk: int = 128          # positions per log-prob chunk (0: full [B, L, V] logits)


def pretrain_loss(config: ModelConfig, actor: Params, pt: dict[str, jax.Array]) -> jax.Array:
    """Mean next-token loss on a pretraining batch `{"tokens": [B, S], "loss_mask"?: [B, S]}`."""
    targets, weights = next_token_targets(pt["tokens"], pt.get("loss_mask"))
    out = chunked_cross_entropy(hidden_states(config, actor, pt["tokens"]), actor["output"], targets, weights)
    return out["loss_sum"] / jnp.maximum(out["count"], 1.0)


def actor_loss(config: ModelConfig, actor: Params, batch: dict[str, jax.Array], pt: Optional[dict[str, jax.Array]],
               ptx_coef: jax.Array, kl_loss_coef: jax.Array, clip: float,
               chunk: int = 128) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`policy_loss + kl_loss_coef·KL_k3(π‖π_ref) + ptx_coef·pretrain_loss` (KL term: GRPO only)."""
    mask = batch["action_mask"]
    logp, entropy = policy_logprobs(config, actor, batch["tokens"], chunk)
    pg, metrics = policy_loss(logp, batch["old_logp"], batch["advantages"], mask, clip)
    kl_term = masked_mean(kl_estimate(logp, batch["ref_logp"], "k3"), mask)
    ptx = pretrain_loss(config, actor, pt) if pt is not None else jnp.zeros((), jnp.float32)
    total = pg + kl_loss_coef * kl_term + ptx_coef * ptx
    return total, {**metrics, "entropy": masked_mean(entropy, mask), "pretrain_loss": ptx,
                   "kl_loss": kl_term, "actor_loss": total}


def critic_loss(config: ModelConfig, critic: Params, batch: dict[str, jax.Array],
                clip: float) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Clipped value loss of the critic on the batch's returns."""
    values = critic_values(config, critic, batch["tokens"])
    return value_loss(values, batch["old_values"], batch["returns"], batch["action_mask"], clip)


def actor_step(config: ModelConfig, actor: Params, opt_state: Any, batch: dict[str, jax.Array],
               pt: Optional[dict[str, jax.Array]], coefs: dict[str, jax.Array], *, tx: optax.GradientTransformation,
               clip: float, chunk: int = 128) -> tuple[Params, Any, dict[str, jax.Array]]:
    """One actor optimizer step (skipped when not finite); `coefs = {"ptx": ..., "kl_loss": ...}` are traced scalars."""
    (loss, metrics), grads = jax.value_and_grad(
        lambda p: actor_loss(config, p, batch, pt, coefs["ptx"], coefs["kl_loss"], clip, chunk), has_aux=True)(actor)
    actor, opt_state, finite, grad_norm = finite_update(tx, actor, opt_state, grads, loss)
    return actor, opt_state, {**metrics, "actor_grad_norm": grad_norm, "actor_finite": finite}


def critic_step(config: ModelConfig, critic: Params, opt_state: Any, batch: dict[str, jax.Array], *,
                tx: optax.GradientTransformation, clip: float) -> tuple[Params, Any, dict[str, jax.Array]]:
    """One critic optimizer step on the clipped value loss (skipped when not finite)."""
    (loss, metrics), grads = jax.value_and_grad(lambda p: critic_loss(config, p, batch, clip), has_aux=True)(critic)
    critic, opt_state, finite, grad_norm = finite_update(tx, critic, opt_state, grads, loss)
    return critic, opt_state, {**metrics, "critic_grad_norm": grad_norm, "critic_finite": finite}


@functools.partial(jax.jit, static_argnames=("cfg",))
def compute_advantages(cfg: PPOConfig, stats: dict[str, jax.Array], scores: jax.Array,
                       mask: jax.Array) -> dict[str, jax.Array]:
    """Per-token KL, rewards, advantages and returns `[B, T]` (PPO: GAE; GRPO: group-normalized)."""
    kl = kl_estimate(stats["old_logp"], stats["ref_logp"], cfg.kl_estimator) * mask
    if cfg.algo == "grpo":
        adv = grpo.token_advantages(grpo.group_advantages(scores, cfg.group_size), mask)
        return {"advantages": adv, "kl": kl}
    rewards = token_rewards(scores, kl, mask, cfg.kl_coef)
    adv, returns = gae(rewards, stats["old_values"], mask, gamma=cfg.gamma, lam=cfg.lam)
    if cfg.whiten_advantages:
        adv = whiten(adv, mask)
    return {"advantages": adv, "returns": returns, "kl": kl}


@functools.lru_cache(maxsize=16)
def _compiled(model: ModelConfig, actor_tx: optax.GradientTransformation,
              critic_tx: Optional[optax.GradientTransformation], clip: float, value_clip: float, chunk: int,
              mesh: Mesh) -> dict[str, Any]:
    """Shardings and jitted steps for one (model, optimizers, mesh): shared by every trainer built with
    them, so tests and restarts compile once. Batches `[B, T]` are split over data × fsdp."""
    a_sh, rep, data = actor_shardings(model, mesh), replicated(mesh), batch_spec(mesh, 2)
    ao_sh = opt_shardings(model, actor_tx, mesh)
    out: dict[str, Any] = {"actor": a_sh, "actor_init": jax.jit(actor_tx.init, out_shardings=ao_sh)}
    out["actor_step"] = jax.jit(functools.partial(actor_step, model, tx=actor_tx, clip=clip, chunk=chunk),
                                in_shardings=(a_sh, ao_sh, data, data, rep), out_shardings=(a_sh, ao_sh, rep),
                                donate_argnums=(0, 1))
    c_sh = None
    if critic_tx is not None:
        c_sh, co_sh = critic_shardings(model, mesh), opt_shardings(model, critic_tx, mesh, critic=True)
        out.update(critic=c_sh, critic_init=jax.jit(critic_tx.init, out_shardings=co_sh))
        out["critic_step"] = jax.jit(functools.partial(critic_step, model, tx=critic_tx, clip=value_clip),
                                     in_shardings=(c_sh, co_sh, data), out_shardings=(c_sh, co_sh, rep),
                                     donate_argnums=(0, 1))
    out["stats"] = jax.jit(functools.partial(rollout_stats, model, chunk=chunk), in_shardings=(a_sh, a_sh, c_sh, data),
                           out_shardings=data)
    return out


@dataclasses.dataclass
class PPOState:
    """Trainable actor/critic (critic None for GRPO), frozen reference, optimizer states, counters."""

    actor: Params
    ref: Params
    critic: Optional[Params]
    actor_opt: Any
    critic_opt: Any
    iteration: int = 0


class PPOTrainer:
    """Runs iterations of rollout → score → advantages → updates; returns per-iteration metrics.

    The sampler sees the full vocabulary (no `vocab_limit`), so the sampling distribution is exactly the
    one whose log-probs the losses use; give the model the tokenizer's vocabulary size. Actor, reference
    and critic (plain or boxed params, numpy or jax leaves) are placed on `mesh` (default: one device).
    """

    def __init__(self, model: ModelConfig, cfg: PPOConfig, actor: Params, critic: Optional[Params],
                 reward_fn: RewardFn, actor_tx: optax.GradientTransformation,
                 critic_tx: Optional[optax.GradientTransformation] = None, *, stop_ids: Sequence[int] = (2,),
                 pad_id: int = 0, pretrain_iter: Optional[Iterator[dict[str, np.ndarray]]] = None, seed: int = 0,
                 mesh: Optional[Mesh] = None):
        if cfg.algo not in ("ppo", "grpo"):
            raise ValueError(f"unknown algo {cfg.algo!r}; expected 'ppo' or 'grpo'")
        if cfg.algo == "ppo" and (critic is None or critic_tx is None):
            raise ValueError("PPO needs a critic (e.g. initialized from the RM) and a critic optimizer")
        self.model, self.cfg, self.reward_fn = model, cfg, reward_fn
        self.actor_tx, self.critic_tx = actor_tx, critic_tx
        self.stop_ids, self.pad_id = tuple(stop_ids), pad_id
        self.pretrain_iter = pretrain_iter
        self.mesh = mesh if mesh is not None else default_mesh()
        j = _compiled(model, actor_tx, critic_tx if cfg.algo == "ppo" else None, cfg.clip, cfg.value_clip,
                      cfg.logprob_chunk, self.mesh)
        self._actor_step, self._critic_step, self._stats = j["actor_step"], j.get("critic_step"), j["stats"]
        wd = model.weight_dtype
        actor_p, ref = place(actor, j["actor"], wd), place(actor, j["actor"], wd)  # separate buffers: ref frozen
        critic_p = place(critic, j["critic"], wd) if cfg.algo == "ppo" else None
        with mesh_context(self.mesh):
            actor_opt = j["actor_init"](actor_p)
            critic_opt = j["critic_init"](critic_p) if critic_p is not None else None
        self.state = PPOState(actor_p, ref, critic_p, actor_opt, critic_opt)
        self.rng = jax.random.key(seed)

    def actor_update(self, batch: dict[str, jax.Array], pt: Optional[dict[str, jax.Array]],
                     coefs: dict[str, jax.Array]) -> dict[str, jax.Array]:
        """One sharded actor step on a minibatch (`[B, T]` arrays); updates the state, returns metrics."""
        st = self.state
        batch, pt = put_batch(self.mesh, batch), None if pt is None else put_batch(self.mesh, pt)
        with mesh_context(self.mesh):
            st.actor, st.actor_opt, m = self._actor_step(st.actor, st.actor_opt, batch, pt, coefs)
        return m

    def critic_update(self, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        """One sharded critic step on a minibatch; updates the state, returns metrics."""
        st = self.state
        with mesh_context(self.mesh):
            st.critic, st.critic_opt, m = self._critic_step(st.critic, st.critic_opt, put_batch(self.mesh, batch))
        return m

    def rollout(self, items: Sequence[PromptItem]) -> tuple[dict[str, Any], list[list[int]], dict[str, float]]:
        """Samples responses, scores them and computes old log-probs/values and advantages."""
        cfg, st = self.cfg, self.state
        if cfg.algo == "grpo":
            items = [it for it in items for _ in range(cfg.group_size)]
        self.rng, sub = jax.random.split(self.rng)
        t0 = time.perf_counter()
        with mesh_context(self.mesh):
            responses = generate(self.model, st.actor, [it["tokens"] for it in items],
                                 max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                                 top_k=cfg.top_k, stop_ids=self.stop_ids, rng=sub, pad_id=self.pad_id)
        t1 = time.perf_counter()
        scores = np.asarray(self.reward_fn(items, responses), np.float32)
        batch = assemble([it["tokens"] for it in items], responses, cfg.max_prompt_len + cfg.max_new_tokens,
                         self.pad_id)
        with mesh_context(self.mesh):
            stats = self._stats(st.actor, st.ref, st.critic, batch["tokens"])
            mask = jnp.asarray(batch["action_mask"])
            batch = {**{k: jnp.asarray(v) for k, v in batch.items()}, **stats,
                     **compute_advantages(cfg, stats, jnp.asarray(scores), mask)}
            jax.block_until_ready(batch)
        t2 = time.perf_counter()
        n_tok = int(sum(len(r) for r in responses))
        timing = {"time/generation": t1 - t0, "time/scoring": t2 - t1, "rollout_tokens": n_tok,
                  "rollout_tokens_per_s": n_tok / max(t1 - t0, 1e-9)}
        return {**batch, "scores": jnp.asarray(scores)}, responses, timing

    def update(self, batch: dict[str, Any]) -> dict[str, float]:
        """PPO epochs over minibatches: critic always (PPO), actor only after the warm-up.

        Minibatch updates with a non-finite loss or gradient are skipped and counted in `skipped_updates`."""
        cfg, st = self.cfg, self.state
        train_actor = cfg.algo == "grpo" or st.iteration >= cfg.critic_warmup_iters
        coefs = {"ptx": jnp.float32(cfg.ptx_coef), "kl_loss": jnp.float32(cfg.kl_coef if cfg.algo == "grpo" else 0.0)}
        keys = ("tokens", "action_mask", "old_logp", "ref_logp", "advantages") + (
            ("returns", "old_values") if st.critic is not None else ())
        n = batch["tokens"].shape[0]
        mb = n // cfg.num_minibatches
        metrics: dict[str, Any] = {}
        skipped = 0
        for _ in range(cfg.ppo_epochs):
            self.rng, sub = jax.random.split(self.rng)
            perm = np.asarray(jax.random.permutation(sub, n))
            for k in range(cfg.num_minibatches):
                idx = perm[k * mb:(k + 1) * mb]
                sub_batch = {key: np.asarray(batch[key])[idx] for key in keys}
                if st.critic is not None:
                    metrics.update(jax.block_until_ready(self.critic_update(sub_batch)))
                    skipped += not bool(metrics["critic_finite"])
                if train_actor:
                    pt = None
                    if self.pretrain_iter is not None and cfg.ptx_coef > 0:
                        pt = {k2: jnp.asarray(v) for k2, v in next(self.pretrain_iter).items()}
                    metrics.update(jax.block_until_ready(self.actor_update(sub_batch, pt, coefs)))
                    skipped += not bool(metrics["actor_finite"])
        jax.block_until_ready((st.actor, st.critic))
        metrics["actor_frozen"] = float(not train_actor)
        metrics["skipped_updates"] = float(skipped)  # non-finite minibatch updates left unapplied
        return {k: float(v) for k, v in metrics.items()}

    def iterate(self, items: Sequence[PromptItem]) -> dict[str, float]:
        """One full iteration; returns scalar metrics including the time breakdown."""
        batch, responses, timing = self.rollout(items)
        t0 = time.perf_counter()
        metrics = self.update(batch)
        t_train = time.perf_counter() - t0
        mask = np.asarray(batch["action_mask"])
        train_tokens = self.cfg.ppo_epochs * mask.shape[0] * mask.shape[1]
        self.state.iteration += 1
        return {**metrics, **timing, "reward": float(np.mean(np.asarray(batch["scores"]))),
                "kl": float(np.mean(np.asarray(batch["kl"]).sum(axis=1))),
                "response_length": float(np.mean([len(r) for r in responses])),
                "time/training": t_train, "train_tokens_per_s": train_tokens / max(t_train, 1e-9),
                "iteration": self.state.iteration}
