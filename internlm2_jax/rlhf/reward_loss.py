"""COOL RLHF reward-model loss: focal-style ranking loss plus a log-barrier on the scores.

For a pair with scores `r_c` (chosen) and `r_r` (rejected), `P = σ(r_c − r_r)` and

    ranking = −(1 − 2·max(0, P − ½))^γ · log P          (γ = 2; the weight is differentiated too)
    barrier = −(log(B − r) + log(B + r))   for r ∈ {r_c, r_r}   (B = 5)
    loss    = ranking + λ · barrier          (λ = 0.02 per the report; XTuner's default is 0.01)

Clamping (exactly): the barrier's logs are evaluated at `rc = clip(r, −B + δ, B − δ)` (δ = 1e-3), so they
never see 0 or a negative argument. Outside that band the barrier continues linearly with its slope at
the clip point, `barrier(r) = barrier(rc) + barrier'(rc)·(r − rc)`, so it stays finite, continuous and its
gradient keeps pushing r back toward 0 (a plain clip would give zero gradient there).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

BARRIER_BOUND = 5.0
BARRIER_DELTA = 1e-3


def ranking_loss(r_chosen: jax.Array, r_rejected: jax.Array, gamma: float = 2.0) -> jax.Array:
    """Per-pair ranking loss `[N]` from scores `[N]` (fp32); `gamma = 0` is the plain −log σ loss."""
    diff = (r_chosen - r_rejected).astype(jnp.float32)
    p = jax.nn.sigmoid(diff)
    weight = (1.0 - 2.0 * jnp.maximum(0.0, p - 0.5)) ** gamma
    return -weight * jax.nn.log_sigmoid(diff)


def log_barrier(r: jax.Array, bound: float = BARRIER_BOUND, delta: float = BARRIER_DELTA) -> jax.Array:
    """`−(log(bound − r) + log(bound + r))` elementwise, with the clamped linear extension (module doc)."""
    r = r.astype(jnp.float32)
    rc = jnp.clip(r, -bound + delta, bound - delta)
    value = -(jnp.log(bound - rc) + jnp.log(bound + rc))
    slope = 1.0 / (bound - rc) - 1.0 / (bound + rc)  # d/dr of the barrier at rc
    return value + jax.lax.stop_gradient(slope) * (r - rc)


def reward_loss(r_chosen: jax.Array, r_rejected: jax.Array, mask: jax.Array | None = None, *,
                gamma: float = 2.0, barrier_weight: float = 0.02,
                bound: float = BARRIER_BOUND) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean over valid pairs of `ranking + λ·(barrier(r_c) + barrier(r_r))`.

    Args:
      r_chosen, r_rejected: `[N]` scores; mask: `[N]` 1 for real pairs (0 for padding), default all ones.
    Returns:
      scalar loss and metrics (`ranking`, `barrier`, `accuracy`, `margin`, `count`).
    """
    mask = jnp.ones_like(r_chosen, jnp.float32) if mask is None else mask.astype(jnp.float32)
    n = jnp.maximum(mask.sum(), 1.0)
    rank = ranking_loss(r_chosen, r_rejected, gamma)
    bar = log_barrier(r_chosen, bound) + log_barrier(r_rejected, bound)
    loss = jnp.sum((rank + barrier_weight * bar) * mask) / n
    metrics = {
        "ranking": jnp.sum(rank * mask) / n,
        "barrier": jnp.sum(bar * mask) / n,
        "accuracy": jnp.sum((r_chosen > r_rejected) * mask) / n,
        "margin": jnp.sum((r_chosen - r_rejected) * mask) / n,
        "count": mask.sum(),
    }
    return loss, metrics
