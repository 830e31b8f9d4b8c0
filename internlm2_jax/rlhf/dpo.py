"""DPO: preference optimization against a frozen reference whose log-probs are computed once and cached.

Batches hold chosen/rejected sequences `[B, L]` (right-padded) with masks `[B, L]` that are 1 on response
tokens; the reference's summed response log-probs are stored in the batch (`ref_chosen`, `ref_rejected`).
"""

from __future__ import annotations

import functools
from typing import Any, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from internlm2_jax.config import ModelConfig
from internlm2_jax.rlhf.preference_data import ChatEncoder, record_conversations
from internlm2_jax.rlhf.rollout import policy_logprobs
from internlm2_jax.train.step import finite_update

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


@functools.partial(jax.jit, static_argnames=("config", "tx", "beta", "label_smoothing"), donate_argnums=(1, 2))
def dpo_step(config: ModelConfig, params: Params, opt_state: Any, batch: dict[str, jax.Array], *,
             tx: optax.GradientTransformation, beta: float = 0.1, label_smoothing: float = 0.0):
    """One optimizer step on the DPO loss of a batch with cached reference log-probs (skipped when not finite)."""
    def loss_fn(p):
        pc = sequence_logps(config, p, batch["chosen"], batch["chosen_mask"])
        pr = sequence_logps(config, p, batch["rejected"], batch["rejected_mask"])
        return dpo_loss(pc, pr, batch["ref_chosen"], batch["ref_rejected"], beta=beta,
                        label_smoothing=label_smoothing)

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    params, opt_state, finite, grad_norm = finite_update(tx, params, opt_state, grads, loss)
    return params, opt_state, {**metrics, "grad_norm": grad_norm, "finite": finite}
