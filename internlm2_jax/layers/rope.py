"""Rotary position embedding (rotate_half convention) with dynamic-NTK and linear scaling."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from internlm2_jax.config import ModelConfig


def rope_base(config: ModelConfig, seq_len: jax.Array | int) -> jax.Array:
    """RoPE base for a call covering `seq_len` positions (dynamic NTK only above max_pos)."""
    base = jnp.asarray(config.rope_theta, jnp.float32)
    scaling = config.rope_scaling_dict
    if scaling is None or scaling.get("type", scaling.get("rope_type")) != "dynamic":
        return base
    factor = float(scaling["factor"])
    d = config.dim_per_head
    m = config.max_position_embeddings
    length = jnp.asarray(seq_len, jnp.float32)
    scaled = base * ((factor * length / m) - (factor - 1.0)) ** (d / (d - 2))
    return jnp.where(length > m, scaled, base)


def rope_cos_sin(
    config: ModelConfig, positions: jax.Array, seq_len: Optional[jax.Array] = None
) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables `[batch, seq, head_dim]` (fp32) for integer `positions [batch, seq]`.

    `seq_len` drives dynamic NTK; default `max(positions) + 1` like the HF reference.
    """
    d = config.dim_per_head
    if seq_len is None:
        seq_len = jnp.max(positions) + 1
    base = rope_base(config, seq_len)
    inv_freq = 1.0 / (base ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    pos = positions.astype(jnp.float32)
    scaling = config.rope_scaling_dict
    if scaling is not None and scaling.get("type", scaling.get("rope_type")) == "linear":
        pos = pos / float(scaling["factor"])
    freqs = pos[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates `x [batch, seq, heads, head_dim]` with `cos/sin [batch, seq, head_dim]`."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos = cos[:, :, None, :].astype(x.dtype)
    sin = sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotated * sin
