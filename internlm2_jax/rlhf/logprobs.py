"""Per-token log-probs and entropies of a sequence, computed in sequence chunks.

The full `[B, L, V]` fp32 logits of a policy never exist: hidden states `[B, L, D]` are projected to the
vocabulary `chunk` positions at a time inside a `lax.scan`, each chunk reduced to its `logsumexp`, target
logit and entropy, and rematerialised in the backward pass (`jax.checkpoint`), like
`internlm2_jax.train.loss.chunked_cross_entropy`. Peak logits memory is `[B, chunk, V]`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from internlm2_jax.config import ModelConfig
from internlm2_jax.model import forward, hidden_states

Params = Any


def shift_right(x: jax.Array) -> jax.Array:
    """`[B, T, ...]` → value at t−1 placed at t (zeros at t = 0)."""
    return jnp.pad(x[:, :-1], [(0, 0), (1, 0)] + [(0, 0)] * (x.ndim - 2))


def token_logprobs(logits: jax.Array, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Action-aligned log-probs and entropies `[B, T]` from full logits `[B, T, V]` of the same sequence."""
    logp_all = jax.nn.log_softmax(shift_right(logits).astype(jnp.float32), axis=-1)
    logp = jnp.take_along_axis(logp_all, tokens[..., None], axis=-1)[..., 0]
    entropy = -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)
    return logp, entropy


def chunked_token_logprobs(hidden: jax.Array, head: jax.Array, tokens: jax.Array,
                           chunk: int = 128, temperature: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """Action-aligned (logp, entropy) `[B, T]` from hidden states `[B, T, D]` and the head `[D, V]`.

    Position s predicts token s+1; the results are shifted right so `logp[:, t]` = log π(tokens[t] |
    tokens[<t]) (0 at t = 0), matching `token_logprobs(hidden @ head / temperature, tokens)`.
    """
    b, t, d = hidden.shape
    targets = jnp.concatenate([tokens[:, 1:], jnp.zeros_like(tokens[:, :1])], axis=1)
    c = max(1, min(chunk, t))
    pad = (-t) % c
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
    n = (t + pad) // c
    xs = (hidden.reshape(b, n, c, d).swapaxes(0, 1), targets.reshape(b, n, c).swapaxes(0, 1))

    @jax.checkpoint
    def one(h: jax.Array, tg: jax.Array) -> tuple[jax.Array, jax.Array]:
        logits = jnp.einsum("bcd,dv->bcv", h, head.astype(h.dtype), preferred_element_type=jnp.float32)
        if temperature != 1.0:
            logits = logits / temperature
        lse = jax.nn.logsumexp(logits, axis=-1)
        lp = jnp.take_along_axis(logits, tg[..., None], axis=-1)[..., 0] - lse
        probs = jnp.exp(logits - lse[..., None])
        ent = lse - jnp.sum(probs * logits, axis=-1)
        return lp, ent

    _, (lp, ent) = jax.lax.scan(lambda carry, x: (carry, one(*x)), None, xs)
    lp = lp.swapaxes(0, 1).reshape(b, n * c)[:, :t]
    ent = ent.swapaxes(0, 1).reshape(b, n * c)[:, :t]
    return shift_right(lp), shift_right(ent)


def policy_logprobs(config: ModelConfig, params: Params, tokens: jax.Array, chunk: int = 128,
                    temperature: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """(logp, entropy) `[B, T]` of `tokens [B, T]` under the policy at sampling `temperature` (action-aligned):
    the distribution the rollout sampled from, `softmax(logits / temperature)`.

    `chunk > 0`: chunked over the sequence (no full logits); `chunk = 0`: the plain full-logits path.
    """
    if chunk <= 0:
        return token_logprobs(forward(config, params, tokens) / temperature, tokens)
    return chunked_token_logprobs(hidden_states(config, params, tokens), params["output"], tokens, chunk,
                                  temperature)
