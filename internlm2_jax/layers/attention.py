"""InternLM2 attention with the fused, group-interleaved `wqkv` projection."""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from internlm2_jax.config import ModelConfig
from internlm2_jax.layers import attention_core
from internlm2_jax.layers.linear import linear
from internlm2_jax.layers.params import constrain, logical_param
from internlm2_jax.layers.rope import apply_rope

KVCache = tuple[jax.Array, ...]
"""(k, v), each `[batch, max_len, kv_heads, head_dim]`; or, int8-quantized, (k, v, k_scale, v_scale) with
int8 k/v and fp32 scales `[batch, max_len, kv_heads, 1]` (one absmax scale per token and kv head)."""


def quantize_kv(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`x [batch, s, kv_heads, head_dim]` → (int8 values, fp32 scales `[batch, s, kv_heads, 1]`): per token and
    head, `x ≈ q · scale` with `|x - q · scale| ≤ scale / 2 = absmax / 254`."""
    x = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(x), axis=-1, keepdims=True) / 127.0
    q = jnp.round(x / jnp.where(scale > 0, scale, 1.0))
    return jnp.clip(q, -127, 127).astype(jnp.int8), scale


def write_cache(cache: jax.Array, new: jax.Array, starts: jax.Array) -> jax.Array:
    """Writes `new [batch, s, kv, d]` into `cache [batch, T, kv, d]` at per-row offsets `starts [batch]`."""
    def one(c, n, s):
        return jax.lax.dynamic_update_slice(c, n.astype(c.dtype), (s, 0, 0))
    return jax.vmap(one)(cache, new, starts)


class Attention(nn.Module):
    """Multi-head attention with GQA.

    `wqkv` has shape `[embed, kv_heads, G + 2, head_dim]`: per kv group, G query heads then the
    key head then the value head (HF rows reshaped `(kv_heads, G + 2, head_dim)`), so tensor
    parallelism over `kv_heads` keeps whole groups together. `wo` is `[heads, head_dim, embed]`.
    """

    config: ModelConfig

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        cos: jax.Array,
        sin: jax.Array,
        segment_ids: Optional[jax.Array],
        cache: Optional[KVCache] = None,
        cache_starts: Optional[jax.Array] = None,
    ) -> tuple[jax.Array, Optional[KVCache]]:
        """`x [batch, seq, embed]` → (`[batch, seq, embed]`, updated cache or None).

        With a cache, the `seq` new tokens of row b are written at `cache_starts[b]` and attend to
        every cached slot `< cache_starts[b] + seq` causally.
        """
        cfg = self.config
        kvh, g, hd, d = cfg.num_key_value_heads, cfg.num_groups, cfg.dim_per_head, cfg.hidden_size
        dt = cfg.compute_dtype
        init = nn.initializers.normal(cfg.initializer_range)
        wqkv = logical_param(self, "wqkv", init, (d, kvh, g + 2, hd),
                             ("embed", "kv_heads", "qkv_group", "head_dim"), cfg.weight_dtype)
        qkv = linear("bsd,dkgh->bskgh", x.astype(dt), wqkv.astype(dt))
        qkv = checkpoint_name(qkv, "qkv")
        b, s = x.shape[:2]
        q = qkv[:, :, :, :g, :].reshape(b, s, kvh * g, hd)
        k, v = qkv[:, :, :, g, :], qkv[:, :, :, g + 1, :]
        q = constrain(apply_rope(q, cos, sin), ("batch", "length", "heads", None))
        k = constrain(apply_rope(k, cos, sin), ("batch", "length", "kv_heads", None))
        v = constrain(v, ("batch", "length", "kv_heads", None))

        if cache is None:
            out = attention_core.attention(q, k, v, segment_ids=segment_ids, causal=True,
                                           impl=cfg.attention_impl)
            new_cache = None
        else:
            if len(cache) == 4:  # int8 cache: stored quantized, dequantized here one layer at a time
                (kq, ks), (vq, vs) = quantize_kv(k), quantize_kv(v)
                new_cache = tuple(write_cache(c, n, cache_starts) for c, n in zip(cache, (kq, vq, ks, vs)))
                k_full = new_cache[0].astype(dt) * new_cache[2].astype(dt)
                v_full = new_cache[1].astype(dt) * new_cache[3].astype(dt)
            else:
                new_cache = (write_cache(cache[0], k, cache_starts), write_cache(cache[1], v, cache_starts))
                k_full, v_full = new_cache[0].astype(dt), new_cache[1].astype(dt)
            out = attention_core.cached_attention(q, k_full, v_full, cache_starts, impl=cfg.attention_impl)
        out = checkpoint_name(out, "attn")
        wo = logical_param(self, "wo", init, (kvh * g, hd, d), ("heads", "head_dim", "embed"), cfg.weight_dtype)
        y = linear("bshd,hde->bse", out.astype(dt), wo.astype(dt))
        return checkpoint_name(y, "attn_out"), new_cache
