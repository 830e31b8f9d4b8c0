"""Rollouts: prompt items, sampling with the jitted KV-cache sampler, sequence assembly, log-probs/values.

Sequences are right-padded `[B, L]` with `L = max_prompt_len + max_new_tokens`; the action mask is 1 on
response tokens. Arrays "per action" are aligned to token positions: `logp[:, t]` is log π(tokens[t] |
tokens[<t]) (from the logits at t − 1) and `values[:, t]` is V(tokens[<t]) (the critic head at t − 1).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from internlm2_jax.config import ModelConfig
from internlm2_jax.rlhf.logprobs import policy_logprobs, shift_right
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


def critic_layout(prefixes: Sequence[Sequence[int]], prompts: Sequence[Sequence[int]],
                  responses: Sequence[Sequence[int]], seq_len: int, pad_id: int = 0,
                  bucket: int = 64) -> dict[str, np.ndarray]:
    """The critic's input in the RM's layout: `critic_tokens [B, Lc]` = RM prefix (the condition's system prompt
    + the conversation) + response, right-padded to a multiple of `bucket`, and `critic_index [B, seq_len]`: for
    the action at actor position `len(prompt) + j`, the critic position `len(prefix) + j − 1` whose head output
    is V(state before that action) (0 off the actions)."""
    lens = [len(p) + len(r) for p, r in zip(prefixes, responses)]
    width = -(-max(lens) // bucket) * bucket
    tokens = np.full((len(prefixes), width), pad_id, np.int32)
    index = np.zeros((len(prefixes), seq_len), np.int32)
    for i, (pre, p, r) in enumerate(zip(prefixes, prompts, responses)):
        tokens[i, : lens[i]] = list(pre) + list(r)
        index[i, len(p): len(p) + len(r)] = np.arange(len(pre) - 1, len(pre) - 1 + len(r))
    return {"critic_tokens": tokens, "critic_index": index}


def critic_values(config: ModelConfig, critic: Params, batch: dict[str, jax.Array]) -> jax.Array:
    """Action-aligned values `[B, T]`: V(state before action t). With `critic_tokens` / `critic_index` (the RM
    layout, see `critic_layout`) the head output at the mapped positions; else the head at t − 1 of `tokens`."""
    if "critic_tokens" in batch:
        values = token_values(config, critic, batch["critic_tokens"])
        return jnp.take_along_axis(values, batch["critic_index"], axis=1)
    return shift_right(token_values(config, critic, batch["tokens"]))


def rollout_stats(config: ModelConfig, actor: Params, ref: Params, critic: Optional[Params],
                  batch: dict[str, jax.Array], chunk: int = 128, temperature: float = 1.0) -> dict[str, jax.Array]:
    """Old log-probs and reference log-probs (at the sampling temperature) and, with a critic, old values,
    all `[B, T]`."""
    logp, _ = policy_logprobs(config, actor, batch["tokens"], chunk, temperature)
    ref_logp, _ = policy_logprobs(config, ref, batch["tokens"], chunk, temperature)
    out = {"old_logp": logp, "ref_logp": ref_logp}
    if critic is not None:
        out["old_values"] = critic_values(config, critic, batch)
    return out


_score_jit = jax.jit(score, static_argnames=("config",))


class RewardModelScorer:
    """Reward function backed by a (frozen) conditional RM.

    Scores `rm_prefix + response + end_ids + [reward_id]`, where trailing `strip_ids` (the sampler's stop
    ids) are removed from the response and `end_ids` re-closes the turn exactly as the RM's training data
    renders it (`<|im_end|>` + the ids of `"\\n"`; see `internlm2_jax.rlhf.prompts.turn_end_ids`). The RM
    prefix carries the prompt's category as the system prompt (see `make_prompt_items`). Sequences are
    padded to a multiple of `bucket` so a few compilations cover all lengths. Runs under `mesh` if given.
    """

    def __init__(self, config: ModelConfig, params: Params, reward_token_id: int, pad_id: int = 0,
                 bucket: int = 64, *, end_ids: Sequence[int] = (), strip_ids: Sequence[int] = (),
                 mesh: Any = None):
        self.config, self.params, self.reward_id, self.pad_id, self.bucket = config, params, reward_token_id, pad_id, bucket
        self.end_ids, self.strip_ids, self.mesh = list(end_ids), set(int(i) for i in strip_ids), mesh

    def sequence(self, item: PromptItem, response: Sequence[int]) -> list[int]:
        """The token ids the RM scores for one response."""
        r = list(response)
        while r and int(r[-1]) in self.strip_ids:
            r.pop()
        return list(item["rm_prefix"]) + r + self.end_ids + [self.reward_id]

    def __call__(self, items: Sequence[PromptItem], responses: Sequence[Sequence[int]]) -> np.ndarray:
        seqs = [self.sequence(it, r) for it, r in zip(items, responses)]
        length = -(-max(len(s) for s in seqs) // self.bucket) * self.bucket
        tokens = np.full((len(seqs), length), self.pad_id, np.int32)
        for i, s in enumerate(seqs):
            tokens[i, : len(s)] = s
        lengths = np.array([len(s) for s in seqs], np.int32)
        if self.mesh is None:
            return np.asarray(_score_jit(self.config, self.params, jnp.asarray(tokens), jnp.asarray(lengths)))
        from internlm2_jax.rlhf.mesh import mesh_context

        with mesh_context(self.mesh):
            return np.asarray(_score_jit(self.config, self.params, jnp.asarray(tokens), jnp.asarray(lengths)))
