"""PPO pieces on token arrays `[B, T]` with an action mask: KL estimators, whitening, clipped losses.

Log ratios are clamped to `±LOG_RATIO_CLAMP` before `exp` (as OpenRLHF does), and masked means select rather
than multiply, so a padded slot holding an extreme or non-finite value cannot turn the loss into inf / NaN.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


LOG_RATIO_CLAMP = 20.0
"""|log π − log π_old| and |log π − log π_ref| beyond this are clamped (exp(20) ≈ 5e8 stays finite in fp32)."""


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of `x` over entries where `mask` is 1 (0 if none); entries off the mask never contribute, even NaN."""
    mask = mask.astype(jnp.float32)
    return jnp.sum(jnp.where(mask > 0, x * mask, 0.0)) / jnp.maximum(mask.sum(), 1.0)


def whiten(x: jax.Array, mask: jax.Array, shift_mean: bool = True, eps: float = 1e-8) -> jax.Array:
    """`(x − mean)/std` over masked entries (mean added back if `shift_mean` is False); 0 off-mask."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    out = (x - mean) * jax.lax.rsqrt(var + eps)
    return (out if shift_mean else out + mean) * mask


def kl_estimate(logp: jax.Array, ref_logp: jax.Array, kind: str = "k1") -> jax.Array:
    """Per-token KL(π‖π_ref) estimate from the sampled tokens' log-probs `[B, T]`.

    k1 = log π − log π_ref (unbiased, can be negative); k3 = (r − 1) − log r with r = π_ref/π
    (unbiased, always ≥ 0, lower variance); k2 = ½(log π − log π_ref)².
    """
    log_ratio = jnp.clip(logp - ref_logp, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio ** 2
    if kind == "k3":
        return jnp.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {kind!r}; expected 'k1', 'k2' or 'k3'")


def token_rewards(scores: jax.Array, kl: jax.Array, mask: jax.Array, kl_coef: float) -> jax.Array:
    """Per-token rewards `[B, T]`: `−kl_coef·KL_t` everywhere, plus the sequence score `[B]` at the last
    masked-in token of each row."""
    mask = mask.astype(jnp.float32)
    t = mask.shape[1]
    last = t - 1 - jnp.argmax(mask[:, ::-1], axis=1)  # index of the last action per row
    at_last = (jnp.arange(t)[None] == last[:, None]) & (mask.sum(1, keepdims=True) > 0)
    return (-kl_coef * kl + scores[:, None] * at_last) * mask


def policy_loss(logp: jax.Array, old_logp: jax.Array, advantages: jax.Array, mask: jax.Array,
                clip: float = 0.2) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Clipped surrogate `mean(max(−A·ρ, −A·clip(ρ, 1±ε)))` with `ρ = exp(clamp(logp − old_logp))`."""
    log_ratio = jnp.clip(logp - old_logp, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = jnp.exp(log_ratio)
    loss1 = -advantages * ratio
    loss2 = -advantages * jnp.clip(ratio, 1.0 - clip, 1.0 + clip)
    loss = masked_mean(jnp.maximum(loss1, loss2), mask)
    clipfrac = masked_mean((loss2 > loss1).astype(jnp.float32), mask)
    approx_kl = masked_mean(0.5 * log_ratio ** 2, mask)
    return loss, {"policy_loss": loss, "clip_frac": clipfrac, "approx_kl": approx_kl}


def value_loss(values: jax.Array, old_values: jax.Array, returns: jax.Array, mask: jax.Array,
               clip: float = 0.2) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Clipped value loss `½·mean(max((V − R)², (V_old + clip(V − V_old, ±ε) − R)²))`."""
    clipped = old_values + jnp.clip(values - old_values, -clip, clip)
    l1, l2 = (values - returns) ** 2, (clipped - returns) ** 2
    loss = 0.5 * masked_mean(jnp.maximum(l1, l2), mask)
    return loss, {"value_loss": loss, "value_clip_frac": masked_mean((l2 > l1).astype(jnp.float32), mask)}


def entropy_from_logits(logits: jax.Array) -> jax.Array:
    """Entropy of the softmax over the last axis: `[..., V]` → `[...]` (fp32)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.sum(jnp.exp(logp) * logp, axis=-1)
