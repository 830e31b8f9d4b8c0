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


class Attention(nn.Module):
    """Multi-head attention with GQA.

    `wqkv` has shape `[embed, kv_heads, G + 2, head_dim]`: per kv group, G query heads then the
    key head then the value head (HF rows reshaped `(kv_heads, G + 2, head_dim)`), so tensor
    parallelism over `kv_heads` keeps whole groups together. `wo` is `[heads, head_dim, embed]`.
    """

    config: ModelConfig
    kv_window: Optional[int] = None
    """With a cache: read only its first `kv_window` positions (every row's start must lie below it)."""

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
        """`x [batch, seq, embed]` → (`[batch, seq, embed]`, the new tokens' cache entries or None).

        With a cache, the `seq` new tokens of row b sit at positions `cache_starts[b]` onward: they attend to
        the cached positions before that and causally to each other. The cache is only read; the second
        output holds what to write at those positions (the caller writes every layer's at once), in the
        cache's form: (k, v) `[batch, seq, kv_heads, head_dim]`, or int8 (k, v, k_scale, v_scale).
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
                                           impl=cfg.attention_impl, kernel_backend=cfg.kernel_backend)
            new_cache = None
        else:
            w = self.kv_window
            if len(cache) == 4:  # int8 cache: the new tokens attend to themselves as the cache will hold them
                old = tuple(c if w is None else c[:, :w] for c in cache)  # dequantize only the window
                w = None
                (kq, ks), (vq, vs) = quantize_kv(k), quantize_kv(v)
                new_cache = (kq, vq, ks, vs)
                k, v = kq.astype(dt) * ks.astype(dt), vq.astype(dt) * vs.astype(dt)
                k_old, v_old = old[0].astype(dt) * old[2].astype(dt), old[1].astype(dt) * old[3].astype(dt)
            else:
                new_cache = (k.astype(cache[0].dtype), v.astype(cache[1].dtype))
                k, v = new_cache[0].astype(dt), new_cache[1].astype(dt)
                k_old, v_old = cache[0].astype(dt), cache[1].astype(dt)
            out = attention_core.cached_attention(q, k_old, v_old, k, v, cache_starts, impl=cfg.attention_impl,
                                                  kernel_backend=cfg.kernel_backend, kv_window=w)
        out = checkpoint_name(out, "attn")
        wo = logical_param(self, "wo", init, (kvh * g, hd, d), ("heads", "head_dim", "embed"), cfg.weight_dtype)
        y = linear("bshd,hde->bse", out.astype(dt), wo.astype(dt))
        return checkpoint_name(y, "attn_out"), new_cache
