"""Generalized advantage estimation over right-padded token sequences (reverse `lax.scan`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def gae(rewards: jax.Array, values: jax.Array, mask: jax.Array, *, gamma: float = 1.0,
        lam: float = 0.99) -> tuple[jax.Array, jax.Array]:
    """Advantages and returns `[B, T]` from per-token rewards/values `[B, T]` and action mask `[B, T]`.

    `δ_t = r_t + γ·m_{t+1}·V_{t+1} − V_t`, `A_t = δ_t + γλ·m_{t+1}·A_{t+1}` (the episode ends after the last
    masked-in token, so nothing is bootstrapped from it); returns `= A + V`. Both are zeroed where mask = 0.
    """
    mask = mask.astype(jnp.float32)
    rewards, values = rewards.astype(jnp.float32) * mask, values.astype(jnp.float32) * mask
    next_values = jnp.pad(values[:, 1:], ((0, 0), (0, 1)))
    next_mask = jnp.pad(mask[:, 1:], ((0, 0), (0, 1)))
    deltas = rewards + gamma * next_mask * next_values - values

    def step(carry, x):
        delta, nm = x
        adv = delta + gamma * lam * nm * carry
        return adv, adv

    _, adv = jax.lax.scan(step, jnp.zeros(rewards.shape[0], jnp.float32), (deltas.T, next_mask.T), reverse=True)
    adv = adv.T * mask
    return adv, (adv + values) * mask
