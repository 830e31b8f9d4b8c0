"""DPO: preference optimization against a frozen reference whose log-probs are computed once and cached.

`DPOTask` is the stage's task for the one `Trainer` (`experiments.dpo`); `dpo_step` is the same step on plain
trees. Batches hold chosen/rejected sequences `[B, L]` (right-padded) with masks `[B, L]` that are 1 on response
tokens; the reference's summed response log-probs are stored in the batch (`ref_chosen`, `ref_rejected`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Iterable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from internlm2_jax.config import ModelConfig
from internlm2_jax.model import init_params
from internlm2_jax.rlhf.preference_data import ChatEncoder, record_conversations
from internlm2_jax.rlhf.rollout import policy_logprobs
from internlm2_jax.train.update import TrainState, update_step

Params = Any


def dpo_loss(pi_chosen: jax.Array, pi_rejected: jax.Array, ref_chosen: jax.Array, ref_rejected: jax.Array, *,
             beta: float = 0.1, label_smoothing: float = 0.0) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`−(1−ε)·log σ(β·h) − ε·log σ(−β·h)`, `h = (π_c − ref_c) − (π_r − ref_r)` (summed log-probs `[B]`)."""
    h = (pi_chosen - ref_chosen) - (pi_rejected - ref_rejected)
    losses = -(1 - label_smoothing) * jax.nn.log_sigmoid(beta * h) - label_smoothing * jax.nn.log_sigmoid(-beta * h)
    return losses.mean(), {"dpo_loss": losses.mean(), "reward_accuracy": (h > 0).mean(),
                           "reward_margin": (beta * h).mean()}


def sequence_logps(config: ModelConfig, params: Params, tokens: jax.Array, mask: jax.Array) -> jax.Array:
    """Sum of response-token log-probs `[B]` (`mask [B, L]` 1 on response tokens)."""
    logp, _ = policy_logprobs(config, params, tokens)
    return jnp.sum(logp * mask, axis=1)


def encode_dpo_batch(records: Sequence[Mapping[str, Any]], tok: ChatEncoder, seq_len: int,
                     pad_id: int = 0) -> dict[str, np.ndarray]:
    """`{prompt, chosen, rejected}` records → tokens/masks for both sides; the mask covers the last assistant
    turn's tokens (its content and `<|im_end|>`, the SFT loss rule), located by character offsets."""
    out = {k: np.full((len(records), seq_len), pad_id, np.int32) for k in ("chosen", "rejected")}
    out.update({f"{k}_mask": np.zeros((len(records), seq_len), np.float32) for k in ("chosen", "rejected")})
    for i, rec in enumerate(records):
        for key, msgs in zip(("chosen", "rejected"), record_conversations(rec)):
            ids, mask = tok.encode_chat_with_mask(msgs, train_on="last")
            out[key][i, : min(len(ids), seq_len)] = ids[:seq_len]
            out[f"{key}_mask"][i, : min(len(ids), seq_len)] = mask[:seq_len]
    return out


_seq_logps = jax.jit(sequence_logps, static_argnames=("config",))


def cache_reference(config: ModelConfig, ref: Params, batches: Iterable[dict[str, np.ndarray]]) -> list[dict]:
    """Adds `ref_chosen`/`ref_rejected` `[B]` to each batch (one reference forward per batch, ever)."""
    return [{**b, "ref_chosen": np.asarray(_seq_logps(config, ref, b["chosen"], b["chosen_mask"])),
             "ref_rejected": np.asarray(_seq_logps(config, ref, b["rejected"], b["rejected_mask"]))}
            for b in batches]


@dataclasses.dataclass(frozen=True)
class DPOTask:
    """DPO loss of the policy against cached reference log-probs (`ref_chosen`, `ref_rejected` in the batch);
    trainable = the policy, nothing frozen (the reference only lives in the cache)."""

    config: ModelConfig
    beta: float = 0.1
    label_smoothing: float = 0.0
    grad_accum: int = 1
    name: str = "dpo"

    def loss(self, params: Params, frozen: Any, batch: dict, rng: Optional[jax.Array]) -> tuple[jax.Array, dict]:
        pc = sequence_logps(self.config, params, batch["chosen"], batch["chosen_mask"])
        pr = sequence_logps(self.config, params, batch["rejected"], batch["rejected_mask"])
        loss, metrics = dpo_loss(pc, pr, batch["ref_chosen"], batch["ref_rejected"], beta=self.beta,
                                 label_smoothing=self.label_smoothing)
        return loss, {"weight": jnp.ones((), jnp.float32), **metrics}

    def boxed_params(self, rng: jax.Array) -> Params:
        return init_params(self.config, rng)


@functools.partial(jax.jit, static_argnames=("config", "tx", "beta", "label_smoothing"), donate_argnums=(1, 2))
def dpo_step(config: ModelConfig, params: Params, opt_state: Any, batch: dict[str, jax.Array], *,
             tx: optax.GradientTransformation, beta: float = 0.1, label_smoothing: float = 0.0):
    """One guarded `DPOTask` step on plain trees without a mesh: `(params, opt_state, metrics)`."""
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state,
                       skipped=jnp.zeros((), jnp.int32))
    state, metrics = update_step(DPOTask(config, beta, label_smoothing).loss, tx, state, None, batch)
    return state.params, state.opt_state, metrics
