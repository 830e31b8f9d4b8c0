"""Conditional reward model: InternLM2 backbone + scalar `v_head` (hidden → 1, no bias).

Params: `{"backbone": <InternLM2 params without "output">, "v_head": [D, 1]}`. The score of a sequence is
the head's output at its reward token (appended after the response); the critic in PPO reuses the same
params and reads the head at every position. The condition is a domain system prompt chosen per sample.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from internlm2_jax.config import ModelConfig
from internlm2_jax.model import InternLM2, init_params

Params = dict[str, Any]

DEFAULT_CONDITIONS: dict[str, str] = {
    "helpful": "You are a reward model judging how helpful and informative the response is.",
    "harmless": "You are a reward model judging whether the response is safe and harmless.",
    "code": "You are a reward model judging the correctness and quality of code in the response.",
    "math": "You are a reward model judging the correctness of the mathematical reasoning and answer.",
    "format": "You are a reward model judging whether the response follows the requested format.",
}


def condition_prompt(condition: Optional[str], conditions: Mapping[str, str]) -> Optional[str]:
    """System prompt text of `condition` (None → no system turn); unknown names raise a clear error."""
    if condition is None:
        return None
    if condition not in conditions:
        raise KeyError(f"unknown reward condition {condition!r}; known: {sorted(conditions)}")
    return conditions[condition]


_init_jit = jax.jit(init_params, static_argnums=0)


def init_policy(config: ModelConfig, rng: jax.Array) -> Params:
    """`internlm2_jax.init_params` under `jax.jit` (boxed leaves): compiled once per config and process,
    much faster than tracing the model op by op for every fresh model."""
    return _init_jit(config, rng)


V_HEAD_AXES = ("embed", None)  # logical axes of `v_head [D, 1]`: shards with the backbone's embed (fsdp)


def init_reward_params(config: ModelConfig, rng: jax.Array, backbone: Optional[Any] = None, *,
                       boxed: bool = False) -> Params:
    """Fresh RM params; `backbone` (e.g. SFT params, boxed or plain) replaces the random backbone.

    The `v_head [D, 1]` starts at zero so initial scores are 0 (inside the barrier, no initial bias).
    `boxed=True` returns `nn.LogicallyPartitioned` leaves (backbone axes from the model, `v_head`
    `V_HEAD_AXES`) for `nn.get_partition_spec` → mesh shardings; a random backbone is then used, so
    call it under `jax.eval_shape` for shardings and place a given backbone with them.
    """
    v_head = jnp.zeros((config.hidden_size, 1), config.weight_dtype)
    if boxed:
        full = init_policy(config, rng) if backbone is None else backbone
        return {"backbone": {k: v for k, v in full.items() if k != "output"},
                "v_head": nn.LogicallyPartitioned(v_head, V_HEAD_AXES)}
    if backbone is None:
        backbone = init_policy(config, rng)
    backbone = {k: v for k, v in nn.meta.unbox(backbone).items() if k != "output"}
    return {"backbone": backbone, "v_head": v_head}


def token_values(config: ModelConfig, params: Params, tokens: jax.Array, *,
                 positions: Optional[jax.Array] = None, segment_ids: Optional[jax.Array] = None) -> jax.Array:
    """Head output at every position: `tokens [B, S]` → `[B, S]` fp32."""
    h = InternLM2(config).apply({"params": params["backbone"]}, tokens, positions, segment_ids, head=False)
    return jnp.einsum("bsd,dk->bsk", h, params["v_head"].astype(h.dtype),
                      preferred_element_type=jnp.float32)[..., 0]


def gather_scores(values: jax.Array, index: jax.Array) -> jax.Array:
    """`values [B, S]` at `index [N, 2]` (row, position) → `[N]`."""
    return values[index[:, 0], index[:, 1]]


def score(config: ModelConfig, params: Params, tokens: jax.Array, lengths: jax.Array) -> jax.Array:
    """Scores of right-padded sequences `tokens [B, S]` whose last real token (at `lengths − 1`) is the
    reward token → `[B]` fp32."""
    values = token_values(config, params, tokens)
    return values[jnp.arange(tokens.shape[0]), lengths - 1]
