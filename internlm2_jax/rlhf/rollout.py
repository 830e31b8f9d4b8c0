"""Rollouts: prompt items, sampling with the jitted KV-cache sampler, sequence assembly, log-probs/values.

Sequences are right-padded `[B, L]` with `L = max_prompt_len + max_new_tokens`; the action mask is 1 on
response tokens. Arrays "per action" are aligned to token positions: `logp[:, t]` is log π(tokens[t] |
tokens[<t]) (from the logits at t − 1) and `values[:, t]` is V(tokens[<t]) (the critic head at t − 1).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from internlm2_jax.config import ModelConfig
from internlm2_jax.model import forward
from internlm2_jax.rlhf.preference_data import ChatEncoder, conditioned
from internlm2_jax.rlhf.reward_model import Params, score, token_values

PromptItem = dict[str, Any]  # {"tokens": actor prompt ids, "category": str | None, "rm_prefix": RM prompt ids}
RewardFn = Callable[[Sequence[PromptItem], Sequence[Sequence[int]]], np.ndarray]


def make_prompt_items(records: Sequence[Mapping[str, Any]], tok: ChatEncoder,
                      conditions: Mapping[str, str]) -> list[PromptItem]:
    """Records `{"messages": [...], "category"?: str}` → items with the actor prompt (generation prompt
    appended) and the RM prefix (the category's system prompt first, so the RM scores conditionally)."""
    items = []
    for rec in records:
        msgs, cat = rec["messages"], rec.get("category")
        items.append({"tokens": tok.encode_chat(msgs, add_generation_prompt=True), "category": cat,
                      "rm_prefix": tok.encode_chat(conditioned(msgs, cat, conditions), add_generation_prompt=True),
                      "messages": msgs})
    return items


def assemble(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], seq_len: int,
             pad_id: int = 0) -> dict[str, np.ndarray]:
    """`tokens [B, seq_len]` (prompt + response, right-padded) and `action_mask [B, seq_len]`."""
    b = len(prompts)
    tokens = np.full((b, seq_len), pad_id, np.int32)
    mask = np.zeros((b, seq_len), np.float32)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        if len(p) + len(r) > seq_len:
            raise ValueError(f"prompt {len(p)} + response {len(r)} tokens exceed seq_len {seq_len}")
        tokens[i, : len(p) + len(r)] = list(p) + list(r)
        mask[i, len(p): len(p) + len(r)] = 1.0
    return {"tokens": tokens, "action_mask": mask}


def shift_right(x: jax.Array) -> jax.Array:
    """`[B, T, ...]` → value at t−1 placed at t (zeros at t = 0)."""
    return jnp.pad(x[:, :-1], [(0, 0), (1, 0)] + [(0, 0)] * (x.ndim - 2))


def token_logprobs(logits: jax.Array, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Action-aligned log-probs and entropies `[B, T]` from logits `[B, T, V]` of the same sequence."""
    logp_all = jax.nn.log_softmax(shift_right(logits).astype(jnp.float32), axis=-1)
    logp = jnp.take_along_axis(logp_all, tokens[..., None], axis=-1)[..., 0]
    entropy = -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)
    return logp, entropy


def policy_logprobs(config: ModelConfig, params: Params, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(logp, entropy) `[B, T]` of `tokens` under the policy `params` (action-aligned)."""
    return token_logprobs(forward(config, params, tokens), tokens)


def critic_values(config: ModelConfig, critic: Params, tokens: jax.Array) -> jax.Array:
    """Action-aligned values `[B, T]`: V(tokens[<t]) from the critic's head at t − 1."""
    return shift_right(token_values(config, critic, tokens))


@functools.partial(jax.jit, static_argnames=("config",))
def rollout_stats(config: ModelConfig, actor: Params, ref: Params, critic: Optional[Params],
                  tokens: jax.Array) -> dict[str, jax.Array]:
    """Old log-probs, reference log-probs and (if a critic is given) old values, all `[B, T]`."""
    logp, _ = policy_logprobs(config, actor, tokens)
    ref_logp, _ = policy_logprobs(config, ref, tokens)
    out = {"old_logp": logp, "ref_logp": ref_logp}
    if critic is not None:
        out["old_values"] = critic_values(config, critic, tokens)
    return out


_score_jit = jax.jit(score, static_argnames=("config",))


class RewardModelScorer:
    """Reward function backed by a (frozen) conditional RM: scores `rm_prefix + response + [reward_id]`.

    The RM prefix carries the prompt's category as the system prompt (see `make_prompt_items`). Sequences
    are padded to a multiple of `bucket` so a few compilations cover all lengths.
    """

    def __init__(self, config: ModelConfig, params: Params, reward_token_id: int, pad_id: int = 0,
                 bucket: int = 64):
        self.config, self.params, self.reward_id, self.pad_id, self.bucket = config, params, reward_token_id, pad_id, bucket

    def __call__(self, items: Sequence[PromptItem], responses: Sequence[Sequence[int]]) -> np.ndarray:
        seqs = [list(it["rm_prefix"]) + list(r) + [self.reward_id] for it, r in zip(items, responses)]
        length = -(-max(len(s) for s in seqs) // self.bucket) * self.bucket
        tokens = np.full((len(seqs), length), self.pad_id, np.int32)
        for i, s in enumerate(seqs):
            tokens[i, : len(s)] = s
        lengths = np.array([len(s) for s in seqs], np.int32)
        return np.asarray(_score_jit(self.config, self.params, jnp.asarray(tokens), jnp.asarray(lengths)))
