"""Attention math shared by the model, the kernels' tests and the benchmarks.

Layouts: queries `[batch, q_len, heads, head_dim]` with query head `h` belonging to kv head
`h // G` (InternLM2's grouping), keys/values `[batch, kv_len, kv_heads, head_dim]`.
"""

from __future__ import annotations

from typing import Optional

import chex
import jax
import jax.numpy as jnp

from internlm2_jax.layers.attention_sharded import (sharded_attention, sharded_flash_attention,
                                                    uses_context_parallelism)

NEG_INF = -0.7 * float(jnp.finfo(jnp.float32).max)
CACHE_BLOCK = 512
"""Key block of `cached_attention` for several new tokens over a longer cache: scores stay `[new, CACHE_BLOCK]`."""


def make_attention_mask(
    q_len: int,
    kv_len: int,
    *,
    q_segment_ids: Optional[jax.Array] = None,
    kv_segment_ids: Optional[jax.Array] = None,
    causal: bool = True,
    q_offset: Optional[jax.Array] = None,
    kv_lengths: Optional[jax.Array] = None,
) -> jax.Array:
    """Boolean mask `[batch|1, q_len, kv_len]`, True where a query may attend a key.

    Causality compares sequence indices: query `i` sits at kv index `q_offset + i`
    (`q_offset` `[batch]`, default 0). `kv_lengths` `[batch]` masks cache slots `>= length`.
    Segment ids `[batch, len]` keep packed documents apart.
    """
    mask = jnp.ones((1, q_len, kv_len), dtype=bool)
    if causal:
        qi = jnp.arange(q_len)[None, :, None]
        if q_offset is not None:
            qi = qi + q_offset[:, None, None]
        mask = mask & (qi >= jnp.arange(kv_len)[None, None, :])
    if q_segment_ids is not None:
        kv_seg = q_segment_ids if kv_segment_ids is None else kv_segment_ids
        mask = mask & (q_segment_ids[:, :, None] == kv_seg[:, None, :])
    if kv_lengths is not None:
        mask = mask & (jnp.arange(kv_len)[None, None, :] < kv_lengths[:, None, None])
    return mask


def xla_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: Optional[jax.Array],
    *,
    scale: Optional[float] = None,
) -> jax.Array:
    """Reference softmax attention with GQA, no repeated K/V.

    Args:
      q: `[batch, q_len, heads, head_dim]`.
      k, v: `[batch, kv_len, kv_heads, head_dim]`.
      mask: bool `[batch|1, q_len, kv_len]` or None.
    Returns:
      `[batch, q_len, heads, head_dim]` in `q.dtype`; softmax in fp32.
    """
    b, s, h, d = q.shape
    kvh = k.shape[2]
    chex.assert_rank([q, k, v], 4)
    chex.assert_equal_shape([k, v])
    if h % kvh:
        raise ValueError(f"query heads {h} not a multiple of kv heads {kvh}")
    scale = d**-0.5 if scale is None else scale
    g, t = h // kvh, k.shape[1]
    # Query heads of one kv group stacked along the query axis: plain batched matmuls over
    # (batch, kv_heads), which XLA:CPU runs ~25 % faster than the 5-D grouped einsum.
    qg = _group_rows(q, kvh)
    kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [b, kv_heads, t, d]
    logits = jnp.einsum("bkqd,bktd->bkqt", qg, kt, preferred_element_type=jnp.float32) * scale
    if mask is not None:  # the same [q_len, kv_len] mask for each of the g stacked query heads
        mask_g = jnp.broadcast_to(mask[:, None, None], (mask.shape[0], 1, g, s, t)).reshape(-1, 1, g * s, t)
        logits = jnp.where(mask_g, logits, NEG_INF)
    # Softmax in the matmul layout: in fp32 its output is the one saved residual (no reshaped copy).
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkqt,bktd->bkqd", probs, vt, preferred_element_type=jnp.float32)
    return _ungroup_rows(out, s).astype(q.dtype)


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    segment_ids: Optional[jax.Array] = None,
    causal: bool = True,
    impl: str = "xla",
    scale: Optional[float] = None,
    kernel_backend: str = "auto",
) -> jax.Array:
    """Self-attention over one packed sequence batch (training / prefill path).

    Args:
      q: `[batch, seq, heads, head_dim]`; k, v: `[batch, seq, kv_heads, head_dim]`.
      segment_ids: `[batch, seq]` int; tokens attend only within their segment.
      impl: `"xla"`, `"pallas"`, `"cudnn"` or `"auto"` (see `ModelConfig.attention_impl`): `"auto"` is the
        Pallas kernels when lowered for a GPU or TPU and XLA otherwise, chosen per lowering platform.
      kernel_backend: the Pallas kernels' backend for `impl="pallas"` (see `ModelConfig.kernel_backend`).
    Returns:
      `[batch, seq, heads, head_dim]`.
    """
    if impl == "auto":
        def by_platform(backend: str):
            def run(q, k, v, seg):
                if backend == "xla":
                    return attention(q, k, v, segment_ids=seg, causal=causal, impl="xla", scale=scale)
                return attention(q, k, v, segment_ids=seg, causal=causal, impl="pallas", scale=scale,
                                 kernel_backend=backend)
            return run
        from kernels_pallas.common import platform_dispatch  # keep pallas off the import path

        return platform_dispatch(by_platform, q, k, v, segment_ids, host="xla")
    if impl == "xla":
        def xla_kernel(q, k, v, segment_ids):
            mask = make_attention_mask(q.shape[1], k.shape[1], q_segment_ids=segment_ids, causal=causal)
            return xla_attention(q, k, v, mask, scale=scale)
        if uses_context_parallelism():  # the sequence axis: all-to-all to a head split (attention_sharded)
            return sharded_attention(xla_kernel, q, k, v, segment_ids)
        return xla_kernel(q, k, v, segment_ids)  # batch / heads: left to the SPMD partitioner
    if impl == "pallas":
        # Pallas flash kernels; on CPU they run in interpret mode (slow, for tests only).
        # Under a mesh the kernel runs per shard (batch over data/fsdp, heads over tensor, and context
        # parallelism over sequence).
        return sharded_flash_attention(q, k, v, segment_ids=segment_ids, causal=causal, scale=scale,
                                       backend=kernel_backend)
    if impl == "cudnn":
        return _cudnn_attention(q, k, v, segment_ids=segment_ids, causal=causal, scale=scale)
    raise ValueError(f"unknown attention_impl {impl!r}; expected xla, pallas, cudnn or auto")


def _cudnn_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    segment_ids: Optional[jax.Array],
    causal: bool,
    scale: Optional[float],
) -> jax.Array:
    """`jax.nn.dot_product_attention(implementation="cudnn")`, checking its constraints first.

    Segment ids become a boolean mask `[B, 1, S, S]` (cuDNN applies it as a bias; this
    materialises O(S^2) per batch row, so prefer "pallas" for long packed sequences).
    """
    if jax.default_backend() != "gpu":
        raise ValueError(f"attention_impl='cudnn' needs a GPU backend, got {jax.default_backend()!r}")
    if q.dtype not in (jnp.bfloat16, jnp.float16) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(
            f"attention_impl='cudnn' needs bf16/fp16 q/k/v of one dtype, got {q.dtype}/{k.dtype}/{v.dtype}"
        )
    d = q.shape[-1]
    if d > 128 or d % 8:
        raise ValueError(f"attention_impl='cudnn' needs head_dim <= 128 and a multiple of 8, got {d}")
    mask = None
    if segment_ids is not None:
        mask = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
    return jax.nn.dot_product_attention(
        q, k, v, mask=mask, scale=scale, is_causal=causal, implementation="cudnn"
    )


def cached_attention(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    k_new: jax.Array,
    v_new: jax.Array,
    starts: jax.Array,
    *,
    impl: str = "xla",
    scale: Optional[float] = None,
    kernel_backend: str = "auto",
    kv_window: Optional[int] = None,
) -> jax.Array:
    """Attention of the new tokens over the cache before them and, causally, over each other.

    Args:
      q: `[batch, s, heads, head_dim]`, the new tokens at cache positions `starts [batch]` onward.
      k_cache, v_cache: `[batch, T, kv_heads, head_dim]`; only positions `< starts` are read as keys.
      k_new, v_new: `[batch, s, kv_heads, head_dim]`, the new tokens' keys and values.
      impl, kernel_backend: as in `attention`.
      kv_window: static; every start lies below it, so only the cache's first `kv_window` positions are read.
    Returns:
      `[batch, s, heads, head_dim]` in `q.dtype`.

    The new keys are not written into the cache first: the caller writes them once for all layers, so a
    decode step never copies a layer's cache. With Pallas, one-token decode runs the decode kernel over the
    cache with the new token as an extra softmax term, and a prefill chunk runs the flash kernel over its own
    tokens, merged (by log-sum-exp) with an XLA pass over the cache before it.
    """
    b, s, h, d = q.shape
    kvh, t = k_cache.shape[2], k_cache.shape[1]
    chex.assert_shape([k_cache, v_cache], (b, t, kvh, d))
    chex.assert_shape([k_new, v_new], (b, s, kvh, d))
    scale = d**-0.5 if scale is None else scale
    if impl == "auto":
        def by_platform(backend: str):
            def run(*args):
                return cached_attention(*args, impl="xla" if backend == "xla" else "pallas", scale=scale,
                                        kernel_backend=backend, kv_window=kv_window)
            return run
        from kernels_pallas.common import platform_dispatch

        return platform_dispatch(by_platform, q, k_cache, v_cache, k_new, v_new, starts, host="xla")
    if impl == "pallas" and s == 1:
        from kernels_pallas import decode_attention

        return decode_attention(q[:, 0], k_cache, v_cache, starts, k_new=k_new[:, 0], v_new=v_new[:, 0],
                                sm_scale=scale, backend=kernel_backend)[:, None]
    if impl == "pallas":
        return _flash_chunk_over_cache(q, k_cache, v_cache, k_new, v_new, starts, scale, kernel_backend)
    if kv_window is not None:
        k_cache, v_cache = k_cache[:, :kv_window], v_cache[:, :kv_window]
        t = k_cache.shape[1]
    g = h // kvh
    qg = _group_rows(q, kvh)
    ln = jnp.einsum("bkqd,btkd->bkqt", qg, k_new, preferred_element_type=jnp.float32) * scale
    qi = jnp.tile(jnp.arange(s), g)[None, None, :, None]
    ln = jnp.where(qi >= jnp.arange(s)[None, None, None, :], ln, NEG_INF)
    if s > 1 and t > CACHE_BLOCK:
        m = jnp.max(ln, axis=-1, keepdims=True)  # the diagonal is never masked: finite from the start
        p = jnp.exp(ln - m)
        acc = jnp.einsum("bkqt,btkd->bkqd", p.astype(v_new.dtype), v_new, preferred_element_type=jnp.float32)
        m, l, acc = _blockwise_over_cache(qg, k_cache, v_cache, starts, scale,
                                          (m, jnp.sum(p, axis=-1, keepdims=True), acc))
        out = acc / l
    else:
        lc = jnp.einsum("bkqd,btkd->bkqt", qg, k_cache, preferred_element_type=jnp.float32) * scale
        old = jnp.arange(t)[None, None, None, :] < starts[:, None, None, None]  # [b, 1, 1, t]
        logits = jnp.concatenate([jnp.where(old, lc, NEG_INF), ln], axis=-1)
        probs = jax.nn.softmax(logits, axis=-1).astype(v_cache.dtype)
        out = (jnp.einsum("bkqt,btkd->bkqd", probs[..., :t], v_cache, preferred_element_type=jnp.float32)
               + jnp.einsum("bkqt,btkd->bkqd", probs[..., t:].astype(v_new.dtype), v_new,
                            preferred_element_type=jnp.float32))
    return _ungroup_rows(out, s).astype(q.dtype)


def _group_rows(q: jax.Array, kvh: int) -> jax.Array:
    """`[b, s, heads, d]` → `[b, kv_heads, g * s, d]`: one kv group's query heads stacked along the query axis
    (row r is query position r % s), so the cache is contracted in its own layout with no transposed copy."""
    b, s, h, d = q.shape
    return q.reshape(b, s, kvh, h // kvh, d).transpose(0, 2, 3, 1, 4).reshape(b, kvh, h // kvh * s, d)


def _ungroup_rows(x: jax.Array, s: int) -> jax.Array:
    """Inverse of `_group_rows`."""
    b, kvh, gs, d = x.shape
    return x.reshape(b, kvh, gs // s, s, d).transpose(0, 3, 1, 2, 4).reshape(b, s, kvh * (gs // s), d)


def _flash_chunk_over_cache(q, k_cache, v_cache, k_new, v_new, starts, scale: float, backend: str) -> jax.Array:
    """A prefill chunk with the Pallas flash kernel over its own tokens (causal, with the log-sum-exp), merged
    with the online softmax over the cache positions before it. Shapes as in `cached_attention`."""
    from kernels_pallas import flash_attention_fwd_with_lse

    b, s, h, d = q.shape
    kvh = k_cache.shape[2]
    out_new, lse_new = flash_attention_fwd_with_lse(q, k_new, v_new, causal=True, sm_scale=scale,
                                                    backend=backend)
    qg = _group_rows(q, kvh)
    lse_new = lse_new.reshape(b, kvh, h // kvh * s, 1)  # [b, heads, s] in the grouped row order
    empty = (jnp.full(lse_new.shape, NEG_INF, jnp.float32), jnp.zeros(lse_new.shape, jnp.float32),
             jnp.zeros(qg.shape, jnp.float32))
    m, l, acc = _blockwise_over_cache(qg, k_cache, v_cache, starts, scale, empty)
    top = jnp.maximum(m, lse_new)
    w_new, w_old = jnp.exp(lse_new - top), jnp.exp(m - top)  # the cache part has l == 0 when it is empty
    out = (_group_rows(out_new, kvh).astype(jnp.float32) * w_new + acc * w_old) / (w_new + l * w_old)
    return _ungroup_rows(out, s).astype(q.dtype)


def _blockwise_over_cache(qg: jax.Array, k_cache: jax.Array, v_cache: jax.Array, starts: jax.Array, scale: float,
                          state: tuple[jax.Array, jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Online softmax over `CACHE_BLOCK`-position blocks of the cache (flash attention's recurrence in XLA), so a
    prefill chunk never holds `[chunk, T]` scores; only blocks below the largest start are visited.

    qg: `[b, kv_heads, g * s, d]`; state: the running max `m`, sum `l` (`[b, kv_heads, g * s, 1]`) and unnormalised
    output `acc` (`[b, kv_heads, g * s, d]`, fp32) so far. Returns them updated with the cache positions < starts.
    Inference only (a `while_loop` of data-dependent length is not reverse-differentiable).
    """
    t = k_cache.shape[1]
    blk = min(CACHE_BLOCK, t)
    m, l, acc = state

    def body(state):
        j, m, l, acc = state
        lo = j * blk
        at = jnp.minimum(lo, t - blk)  # the last block is shifted back; positions < lo were counted already
        kb = jax.lax.dynamic_slice_in_dim(k_cache, at, blk, axis=1)
        vb = jax.lax.dynamic_slice_in_dim(v_cache, at, blk, axis=1)
        pos = at + jnp.arange(blk)
        keep = (pos[None, :] >= lo) & (pos[None, :] < starts[:, None])  # [b, blk]
        sc = jnp.einsum("bkqd,btkd->bkqt", qg, kb, preferred_element_type=jnp.float32) * scale
        sc = jnp.where(keep[:, None, None, :], sc, NEG_INF)
        m_new = jnp.maximum(m, jnp.max(sc, axis=-1, keepdims=True))
        p = jnp.where(keep[:, None, None, :], jnp.exp(sc - m_new), 0.0)
        corr = jnp.exp(m - m_new)
        acc = acc * corr + jnp.einsum("bkqt,btkd->bkqd", p.astype(vb.dtype), vb, preferred_element_type=jnp.float32)
        return j + 1, m_new, l * corr + jnp.sum(p, axis=-1, keepdims=True), acc

    n_blocks = (jnp.max(starts) + blk - 1) // blk
    _, m, l, acc = jax.lax.while_loop(lambda st: st[0] < n_blocks, body, (jnp.int32(0), m, l, acc))
    return m, l, acc
