"""RL fine-tuning (PPO, GRPO, RLOO, ... by name, see `algorithms`): rollout → score → advantages → updates.

One iteration is one step of the training loop: `RLTrainer.loop_step(state, prompt_indices)`. The `RLState`
carries everything that changes (actor and critic `TrainState`s with their optimizer states, the rollout rng, the
iteration counter that ends the critic warm-up, the count of iterations in a row with skipped updates), so a
checkpoint of it plus the prompt and pretraining iterators resumes exactly. The frozen reference lives on the
trainer. Actor and critic updates are the one `Trainer`'s steps (`rl_tasks.ActorTask` / `CriticTask`), jitted
with explicit shardings on the `mesh`; rollout batches stay on device and minibatches are gathered there.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Iterator, Optional, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from internlm2_jax.config import ModelConfig
from internlm2_jax.params_loading import place
from internlm2_jax.rlhf.algorithms import get_algorithm, samples_per_prompt
from internlm2_jax.rlhf.mesh import actor_shardings, critic_shardings, default_mesh
from internlm2_jax.rlhf.ppo import kl_estimate
from internlm2_jax.rlhf.rl_tasks import PT_PREFIX, ActorTask, CriticTask
from internlm2_jax.rlhf.rollout import PromptItem, RewardFn, assemble, critic_layout, rollout_stats
from internlm2_jax.generate import generate
from internlm2_jax.sharding import data_sharding, replicated
from internlm2_jax.train.trainer import Trainer, mesh_context
from internlm2_jax.train.update import TrainState

Params = Any


@dataclasses.dataclass(frozen=True)
class RLConfig:
    """Hyper-parameters (defaults: the report's PPO recipe where it gives one, else OpenRLHF's)."""

    algo: str = "ppo"                 # a registered algorithm: "ppo" (GAE + critic), "grpo", "rloo", ...
    batch_size: int = 16              # prompts per iteration (grouped algorithms: × group_size responses)
    group_size: int = 4               # responses per prompt for grouped algorithms (GRPO, RLOO)
    max_prompt_len: int = 64
    max_new_tokens: int = 32
    temperature: float = 1.0          # sampling temperature; log-probs use the same (softmax(logits / T))
    top_p: float = 0.9
    top_k: int = 0
    kl_coef: float = 0.01             # KL to the reference: per-token reward penalty, or loss weight (GRPO)
    kl_estimator: str = "k1"          # "k1" | "k2" | "k3" for the reward penalty (the loss term is k3)
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
    missing_eos_penalty: Optional[float] = None  # added to the score of a response that ends without a stop id
    normalize_rewards: bool = False   # scores → (s − mean) / std over the rollout batch
    reward_clip: Optional[float] = 10.0  # scores clipped to ±this after normalisation (OpenRLHF's default)


@flax.struct.dataclass
class RLState:
    """What one RL iteration changes (saved by the loop's checkpoints)."""

    actor_state: TrainState
    critic_state: Optional[TrainState]
    rng: jax.Array          # raw key data of the rollout / minibatch rng
    iteration: jax.Array    # int32: completed iterations (the critic warm-up counter)
    skipped: jax.Array      # int32: iterations in a row with a skipped (non-finite) update

    @property
    def actor(self) -> Params:
        return self.actor_state.params

    @property
    def critic(self) -> Optional[Params]:
        return None if self.critic_state is None else self.critic_state.params

    @property
    def actor_opt(self) -> Any:
        return self.actor_state.opt_state

    @property
    def critic_opt(self) -> Any:
        return None if self.critic_state is None else self.critic_state.opt_state


@functools.lru_cache(maxsize=32)
def _trainer(task: Any, tx: optax.GradientTransformation, mesh: Mesh) -> Trainer:
    """Trainers (and so compiled steps) shared by every RL trainer with the same task, optimizer and mesh."""
    return Trainer(task, tx, mesh)


@functools.lru_cache(maxsize=16)
def _stats_fn(model: ModelConfig, chunk: int, temperature: float, mesh: Mesh) -> Any:
    return jax.jit(functools.partial(rollout_stats, model, chunk=chunk, temperature=temperature),
                   out_shardings=data_sharding(mesh, 2))


@functools.partial(jax.jit, static_argnames=("cfg",))
def compute_advantages(cfg: RLConfig, stats: dict[str, jax.Array], scores: jax.Array,
                       mask: jax.Array) -> dict[str, jax.Array]:
    """Per-token KL `[B, T]` plus the registered algorithm's advantages (and returns)."""
    kl = kl_estimate(stats["old_logp"], stats["ref_logp"], cfg.kl_estimator) * mask
    return {**get_algorithm(cfg.algo).advantages(cfg, scores, kl, stats, mask), "kl": kl}


def shape_scores(cfg: RLConfig, scores: np.ndarray, responses: Sequence[Sequence[int]],
                 stop_ids: Sequence[int]) -> np.ndarray:
    """Missing-EOS penalty, then batch normalisation, then clipping (each when configured)."""
    scores = np.asarray(scores, np.float32).copy()
    if cfg.missing_eos_penalty is not None:
        ended = np.array([bool(r) and int(r[-1]) in set(stop_ids) for r in responses])
        scores[~ended] += cfg.missing_eos_penalty
    if cfg.normalize_rewards and len(scores) > 1:
        scores = (scores - scores.mean()) / (scores.std() + 1e-8)
    if cfg.reward_clip is not None:
        scores = np.clip(scores, -cfg.reward_clip, cfg.reward_clip)
    return scores


class RLTrainer:
    """Runs iterations of rollout → score → advantages → updates; returns per-iteration metrics.

    The sampler sees the full vocabulary (no `vocab_limit`), so the sampling distribution is exactly the
    one whose log-probs the losses use; give the model the tokenizer's vocabulary size. Actor, reference
    and critic (plain or boxed params, numpy or jax leaves) are placed on `mesh` (default: one device).
    `pretrain_iter` yields this process's pretraining batches (`tokens [Bp, S]`, optional `loss_mask`,
    `segment_ids`, `positions`) for the ptx loss.
    """

    def __init__(self, model: ModelConfig, cfg: RLConfig, actor: Params, critic: Optional[Params],
                 reward_fn: RewardFn, actor_tx: optax.GradientTransformation,
                 critic_tx: Optional[optax.GradientTransformation] = None, *, stop_ids: Sequence[int] = (2,),
                 pad_id: int = 0, pretrain_iter: Optional[Iterator[dict[str, np.ndarray]]] = None, seed: int = 0,
                 mesh: Optional[Mesh] = None):
        self.algo = get_algorithm(cfg.algo)
        if self.algo.needs_critic and (critic is None or critic_tx is None):
            raise ValueError(f"{cfg.algo} needs a critic (e.g. initialized from the RM) and a critic optimizer")
        self.model, self.cfg, self.reward_fn = model, cfg, reward_fn
        self.stop_ids, self.pad_id = tuple(stop_ids), pad_id
        self.pretrain_iter = pretrain_iter
        self.mesh = mesh if mesh is not None else default_mesh()
        self.actor_trainer = _trainer(ActorTask(model, cfg.clip, cfg.logprob_chunk, cfg.temperature), actor_tx,
                                      self.mesh)
        self.critic_trainer = (_trainer(CriticTask(model, cfg.value_clip), critic_tx, self.mesh)
                               if self.algo.needs_critic else None)
        self._stats = _stats_fn(model, cfg.logprob_chunk, cfg.temperature, self.mesh)
        self.ref = place(actor, actor_shardings(model, self.mesh), model.weight_dtype)
        self.state = self.initial_state(actor, critic, seed)

    def initial_state(self, actor: Params, critic: Optional[Params], seed: int) -> RLState:
        """Step 0: the given actor / critic with fresh optimizer states."""
        critic_state = None
        if self.critic_trainer is not None:
            critic_state = self.critic_trainer.state_from_params(
                place(critic, critic_shardings(self.model, self.mesh), self.model.weight_dtype))
        return RLState(actor_state=self.actor_trainer.state_from_params(actor), critic_state=critic_state,
                       rng=jax.device_put(jax.random.key_data(jax.random.key(seed)), replicated(self.mesh)),
                       iteration=jnp.zeros((), jnp.int32), skipped=jnp.zeros((), jnp.int32))

    def abstract_state(self) -> RLState:
        """Shapes / shardings of `RLState` (the restore target of a checkpoint)."""
        rep = replicated(self.mesh)
        key = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))
        scalar = jax.ShapeDtypeStruct((), jnp.int32, sharding=rep)
        return RLState(actor_state=self.actor_trainer.abstract_state(),
                       critic_state=None if self.critic_trainer is None else self.critic_trainer.abstract_state(),
                       rng=jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=rep), iteration=scalar,
                       skipped=scalar)

    def _split_rng(self) -> jax.Array:
        key, sub = jax.random.split(jax.random.wrap_key_data(self.state.rng))
        self.state = self.state.replace(rng=jax.random.key_data(key))
        return sub

    # ---- updates -----------------------------------------------------------------------------------
    def actor_update(self, batch: dict[str, Any], pt: Optional[dict[str, Any]],
                     coefs: dict[str, Any]) -> dict[str, jax.Array]:
        """One actor step on a minibatch (`[B, T]`), `pt` a pretraining batch or None, `coefs = {"ptx", "kl_loss"}`."""
        b = {k: batch[k] for k in ("tokens", "action_mask", "old_logp", "ref_logp", "advantages")}
        b.update(ptx_coef=jnp.float32(coefs["ptx"]), kl_loss_coef=jnp.float32(coefs["kl_loss"]))
        if pt is not None:
            b.update({PT_PREFIX + k: v for k, v in pt.items()})
        state, m = self.actor_trainer.step(self.state.actor_state, b)
        self.state = self.state.replace(actor_state=state)
        return {**{k: v for k, v in m.items() if k not in ("grad_norm", "finite", "loss", "objective", "weight",
                                                           "skipped")},
                "actor_grad_norm": m["grad_norm"], "actor_finite": m["finite"]}

    def critic_update(self, batch: dict[str, Any]) -> dict[str, jax.Array]:
        """One critic step on a minibatch; returns its metrics."""
        keys = ("action_mask", "old_values", "returns") + (
            ("critic_tokens", "critic_index") if "critic_tokens" in batch else ("tokens",))
        state, m = self.critic_trainer.step(self.state.critic_state, {k: batch[k] for k in keys})
        self.state = self.state.replace(critic_state=state)
        return {"value_loss": m["value_loss"], "value_clip_frac": m["value_clip_frac"],
                "critic_grad_norm": m["grad_norm"], "critic_finite": m["finite"]}

    # ---- one iteration -----------------------------------------------------------------------------
    def rollout(self, items: Sequence[PromptItem]) -> tuple[dict[str, Any], list[list[int]], dict[str, float]]:
        """Samples responses, scores them and computes old log-probs / values and advantages (on device)."""
        cfg = self.cfg
        k = samples_per_prompt(self.algo, cfg.group_size)
        items = [it for it in items for _ in range(k)]
        sub = self._split_rng()
        t0 = time.perf_counter()
        with mesh_context(self.mesh):
            responses = generate(self.model, self.state.actor, [it["tokens"] for it in items],
                                 max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                                 top_k=cfg.top_k, stop_ids=self.stop_ids, rng=sub, pad_id=self.pad_id,
                                 mesh=self.mesh)
        t1 = time.perf_counter()
        raw = np.asarray(self.reward_fn(items, responses), np.float32)
        scores = shape_scores(cfg, raw, responses, self.stop_ids)
        prompts = [it["tokens"] for it in items]
        host = assemble(prompts, responses, cfg.max_prompt_len + cfg.max_new_tokens, self.pad_id)
        if self.critic_trainer is not None and all("rm_prefix" in it for it in items):
            host.update(critic_layout([it["rm_prefix"] for it in items], prompts, responses,
                                      host["tokens"].shape[1], self.pad_id))
        batch = jax.device_put(host, {k: data_sharding(self.mesh, v.ndim) for k, v in host.items()})
        with mesh_context(self.mesh):
            stats = self._stats(self.state.actor, self.ref, self.state.critic, batch)
            scores_d = jax.device_put(scores, data_sharding(self.mesh, 1))
            batch = {**batch, **stats, **compute_advantages(cfg, stats, scores_d, batch["action_mask"]),
                     "scores": scores_d}
            jax.block_until_ready(batch)
        t2 = time.perf_counter()
        n_tok = int(sum(len(r) for r in responses))
        timing = {"time/generation": t1 - t0, "time/scoring": t2 - t1, "rollout_tokens": n_tok,
                  "rollout_tokens_per_s": n_tok / max(t1 - t0, 1e-9), "reward": float(raw.mean())}
        return batch, responses, timing

    def _pretrain_batch(self) -> Optional[dict[str, Any]]:
        if self.pretrain_iter is None or self.cfg.ptx_coef <= 0:
            return None
        local = next(self.pretrain_iter)
        return {k: jax.make_array_from_process_local_data(data_sharding(self.mesh, np.ndim(v)), np.asarray(v))
                for k, v in local.items()}

    def update(self, batch: dict[str, Any]) -> dict[str, float]:
        """`ppo_epochs` over `num_minibatches` minibatches: the critic always (if any), the actor after the warm-up.

        Minibatch updates with a non-finite loss or gradient are skipped and counted in `skipped_updates`."""
        cfg, algo = self.cfg, self.algo
        train_actor = not algo.needs_critic or int(self.state.iteration) >= cfg.critic_warmup_iters
        coefs = {"ptx": cfg.ptx_coef, "kl_loss": cfg.kl_coef if algo.kl_in_loss else 0.0}
        n = batch["tokens"].shape[0]
        mb = n // cfg.num_minibatches
        metrics: dict[str, Any] = {}
        skipped = 0
        for _ in range(cfg.ppo_epochs):
            perm = jax.random.permutation(self._split_rng(), n)
            for k in range(cfg.num_minibatches):
                idx = perm[k * mb:(k + 1) * mb]
                sub = {key: jnp.take(v, idx, axis=0) for key, v in batch.items() if jnp.ndim(v) >= 1}
                if self.critic_trainer is not None:
                    metrics.update(jax.device_get(self.critic_update(sub)))
                    skipped += not bool(metrics["critic_finite"])
                if train_actor:
                    metrics.update(jax.device_get(self.actor_update(sub, self._pretrain_batch(), coefs)))
                    skipped += not bool(metrics["actor_finite"])
        metrics["actor_frozen"] = float(not train_actor)
        metrics["skipped_updates"] = float(skipped)  # non-finite minibatch updates left unapplied
        return {k: float(v) for k, v in metrics.items()}

    def iterate(self, items: Sequence[PromptItem]) -> dict[str, float]:
        """One full iteration; returns scalar metrics including the time breakdown."""
        batch, responses, timing = self.rollout(items)
        t0 = time.perf_counter()
        metrics = self.update(batch)
        t_train = time.perf_counter() - t0
        train_tokens = self.cfg.ppo_epochs * batch["tokens"].shape[0] * batch["tokens"].shape[1]
        st = self.state
        skipped = jnp.where(metrics["skipped_updates"] > 0, st.skipped + 1, 0).astype(jnp.int32)
        self.state = st.replace(iteration=st.iteration + 1, skipped=skipped)
        return {**metrics, **timing, "shaped_reward": float(jnp.mean(batch["scores"])),  # replicated scalars:
                "kl": float(jnp.mean(jnp.sum(batch["kl"], axis=1))),                    # readable on every host
                "response_length": float(np.mean([len(r) for r in responses])),
                "time/training": t_train, "train_tokens_per_s": train_tokens / max(t_train, 1e-9),
                "iteration": int(self.state.iteration)}

    def loop_step(self, items: Sequence[PromptItem]):
        """`step_fn` for `internlm2_jax.train.loop.run_loop`: `(state, prompt_indices) -> (state, metrics)`."""
        def step(state: RLState, indices: np.ndarray) -> tuple[RLState, dict]:
            self.state = state
            m = self.iterate([items[int(i)] for i in indices])
            return self.state, {**m, "finite": m["skipped_updates"] == 0, "skipped": int(self.state.skipped)}

        return step
