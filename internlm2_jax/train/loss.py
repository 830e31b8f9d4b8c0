"""Next-token cross-entropy computed in sequence chunks (no full `[B, S, V]` fp32 logits)."""

from __future__ import annotations

from typing import Optional

import chex
import jax
import jax.numpy as jnp

from internlm2_jax.layers.linear import linear


def next_token_targets(
    tokens: jax.Array, loss_mask: Optional[jax.Array] = None, segment_ids: Optional[jax.Array] = None
) -> tuple[jax.Array, jax.Array]:
    """Targets `[B, S]` (token t+1) and weights `[B, S]` (fp32).

    Position t is trained iff token t+1 is a target (`loss_mask[t+1]`) of the same segment; the
    last position never is.
    """
    targets = jnp.concatenate([tokens[:, 1:], jnp.zeros_like(tokens[:, :1])], axis=1)
    valid = jnp.ones(tokens.shape, bool) if loss_mask is None else loss_mask.astype(bool)
    valid = jnp.concatenate([valid[:, 1:], jnp.zeros_like(valid[:, :1])], axis=1)
    if segment_ids is not None:
        same = segment_ids[:, 1:] == segment_ids[:, :-1]
        valid = valid & jnp.concatenate([same & (segment_ids[:, 1:] != 0), jnp.zeros_like(same[:, :1])], axis=1)
    return targets, valid.astype(jnp.float32)


def chunked_cross_entropy(
    hidden: jax.Array,
    head: jax.Array,
    targets: jax.Array,
    weights: jax.Array,
    *,
    chunk_size: int = 512,
    z_loss: float = 0.0,
) -> dict[str, jax.Array]:
    """Sums of token losses over `[B, S]`, computing logits `chunk_size` positions at a time.

    Args:
      hidden: `[B, S, D]` final-normed hidden states (compute dtype).
      head: `[D, V]` output projection.
      targets, weights: `[B, S]` from `next_token_targets`.
      z_loss: weight of `logsumexp(logits)²` (PaLM-style), 0 disables it.
    Returns:
      `{"loss_sum", "z_loss_sum", "correct", "count"}` scalars (fp32); the mean loss is
      `(loss_sum + z_loss_sum) / count`. With several chunks, each is rematerialised in the
      backward pass; `correct` counts positions whose target logit is the row's unique maximum.
    """
    b, s, d = hidden.shape
    chex.assert_shape([targets, weights], (b, s))
    c = min(chunk_size, s)
    pad = (-s) % c
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
        weights = jnp.pad(weights, ((0, 0), (0, pad)))
    n = (s + pad) // c
    xs = (hidden.reshape(b, n, c, d).swapaxes(0, 1), targets.reshape(b, n, c).swapaxes(0, 1),
          weights.reshape(b, n, c).swapaxes(0, 1))

    def chunk(h, t, w):
        logits = linear("bcd,dv->bcv", h, head.astype(h.dtype), out_dtype=jnp.float32)
        lse = jax.nn.logsumexp(logits, axis=-1)
        target_logit = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0]
        # "Correct" = the target's logit is the unique maximum; a tie is wrong (collapsed weights give
        # all-equal logits, which must read as accuracy 0, not 1). Max + count reductions are much cheaper
        # than argmax on XLA:CPU for [*, 92544]-wide rows.
        top = jnp.max(logits, axis=-1)
        unique = jnp.sum((logits == top[..., None]).astype(jnp.int32), axis=-1) == 1
        correct = jax.lax.stop_gradient((target_logit >= top) & unique).astype(jnp.float32)
        return jnp.stack([jnp.sum((lse - target_logit) * w), jnp.sum(z_loss * lse**2 * w),
                          jnp.sum(correct * w), jnp.sum(w)])

    if n == 1:  # one chunk: nothing to bound, so no rematerialisation of the logits
        acc = chunk(*(x[0] for x in xs))
    else:
        remat_chunk = jax.checkpoint(chunk)

        def body(acc, x):
            return acc + remat_chunk(*x), None

        acc, _ = jax.lax.scan(body, jnp.zeros(4, jnp.float32), xs)
    return {"loss_sum": acc[0], "z_loss_sum": acc[1], "correct": acc[2], "count": acc[3]}
