"""Split-K decode attention: one query token per sequence over a KV cache, GQA-native.

`decode_attention(q [B, H, D], k_cache [B, T, KV, D], v_cache, lengths [B]) -> [B, H, D]`.
Slots `>= lengths[b]` are ignored; a row with length 0 returns 0. With `k_new, v_new [B, KV, D]` the new
token (not yet written into the cache) is attended too, so a decode step needs no copy of the cache.

Design: grid `(B, KV, splits)`. A program loads the G query heads of one kv head (padded to a
power of two, >= 16 rows so Triton's `dot` applies) and streams its share of the cache in
`block_k` tiles, skipping tiles past the row's length; it writes an unnormalised partial
(acc, running max m, sum l). A tiny XLA combine merges the splits (log-sum-exp rescaling).
Splitting T keeps all SMs busy when `B * KV` alone is too small to fill the GPU.

Why this matters little for speed: decode reads every cache byte once and does ~2 flops/byte
(G flops per loaded element), far below the H100's ~300 flop/byte ridge, so XLA's fused
einsum is already near HBM bandwidth; the kernel's wins are skipping slots past `lengths`
and not materialising the fp32 logits. On TPU the Mosaic kernel in `decode_tpu` computes the same partials
(head widths that are multiples of 128; others use the XLA reference here).
"""

from __future__ import annotations

import functools
from typing import Optional

import chex
import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels_pallas.common import MASK_VALUE, check_head_dim, next_pow2, pad_axis
from kernels_pallas.common import padded_head_dim, platform_dispatch, resolve_backend, round_up
from kernels_pallas import decode_tpu


def _decode_kernel(len_ref, q_ref, k_ref, v_ref, acc_ref, m_ref, l_ref, *, scale, bk, chunk):
    split = pl.program_id(2)
    length = len_ref[0]
    q = q_ref[...]  # [Gp, D]
    start = split * chunk
    n_blocks = jnp.clip(lax.div(length - start + bk - 1, bk), 0, chunk // bk)
    prec = lax.Precision.HIGHEST if q.dtype == jnp.float32 else None

    def body(i, carry):
        acc, m, l = carry
        sl = pl.ds(i * bk, bk)
        k, v = k_ref[sl, :], v_ref[sl, :]
        s = plgpu.dot(q, k, trans_b=True, precision=prec) * scale  # [Gp, bk]
        pos = start + i * bk + jnp.arange(bk)
        s = jnp.where((pos < length)[None, :], s, MASK_VALUE)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new[:, None])
        l = alpha * l + jnp.sum(p, axis=1)
        acc = alpha[:, None] * acc + plgpu.dot(p.astype(v.dtype), v, precision=prec)
        return acc, m_new, l

    gp = q.shape[0]
    init = (jnp.zeros(q.shape, jnp.float32), jnp.full((gp,), MASK_VALUE, jnp.float32),
            jnp.zeros((gp,), jnp.float32))
    acc, m, l = lax.fori_loop(0, n_blocks, body, init)
    acc_ref[...], m_ref[...], l_ref[...] = acc, m, l


def _reference_partials(qg, k_cache, v_cache, lengths, scale):
    """XLA partials (one split): qg `[B, KV, G, D]` → acc `[B, KV, 1, G, D]`, m, l `[B, KV, 1, G]`."""
    s = jnp.einsum("bkgd,btkd->bkgt", qg, k_cache, preferred_element_type=jnp.float32) * scale
    valid = jnp.arange(k_cache.shape[1])[None, :] < lengths[:, None]
    s = jnp.where(valid[:, None, None, :], s, MASK_VALUE)
    m = jnp.max(s, axis=-1)
    p = jnp.where(valid[:, None, None, :], jnp.exp(s - m[..., None]), 0.0)
    acc = jnp.einsum("bkgt,btkd->bkgd", p.astype(v_cache.dtype), v_cache, preferred_element_type=jnp.float32)
    return acc[:, :, None], m[:, :, None], jnp.sum(p, axis=-1)[:, :, None]


def _gpu_partials(qg, k_cache, v_cache, lengths, scale, block_k, num_splits, interpret):
    """Triton split-K partials: qg `[B, KV, G, D]` → acc `[B, KV, splits, G, D]`, m, l `[B, KV, splits, G]`."""
    b, kvh, g, d_out = qg.shape
    t = k_cache.shape[1]
    d = padded_head_dim(d_out)
    qg, k_cache, v_cache = (pad_axis(x, x.ndim - 1, d) for x in (qg, k_cache, v_cache))
    gp = max(16, next_pow2(g))
    bk = min(block_k, max(16, next_pow2(t)))
    n_blocks = -(-t // bk)
    splits = num_splits or max(1, min(n_blocks, -(-128 // (b * kvh))))
    chunk = round_up(n_blocks, splits) // splits * bk
    tp = chunk * splits
    qg = pad_axis(qg, 2, gp)  # zero rows beyond G are sliced off below
    kp, vp = pad_axis(k_cache, 1, tp), pad_axis(v_cache, 1, tp)
    lens = jnp.minimum(lengths.astype(jnp.int32), t)[:, None]  # [B, 1]

    kv_spec = pl.BlockSpec((None, chunk, None, d), lambda bi, ki, si: (bi, si, ki, 0))
    part = (b, kvh, splits, gp)
    acc, m, l = pl.pallas_call(
        functools.partial(_decode_kernel, scale=scale, bk=bk, chunk=chunk),
        grid=(b, kvh, splits),
        in_specs=[pl.BlockSpec((None, 1), lambda bi, ki, si: (bi, 0)),
                  pl.BlockSpec((None, None, gp, d), lambda bi, ki, si: (bi, ki, 0, 0)),
                  kv_spec, kv_spec],
        out_specs=[pl.BlockSpec((None, None, None, gp, d), lambda bi, ki, si: (bi, ki, si, 0, 0)),
                   pl.BlockSpec((None, None, None, gp), lambda bi, ki, si: (bi, ki, si, 0)),
                   pl.BlockSpec((None, None, None, gp), lambda bi, ki, si: (bi, ki, si, 0))],
        out_shape=[jax.ShapeDtypeStruct((*part, d), jnp.float32),
                   jax.ShapeDtypeStruct(part, jnp.float32),
                   jax.ShapeDtypeStruct(part, jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret,
        name="flash_decode",
    )(lens, qg, kp, vp)
    return acc[..., :g, :d_out], m[..., :g], l[..., :g]


def _tpu_partials(qg, k_cache, v_cache, lengths, scale, interpret):
    """Mosaic partials (one split) where the kernel applies, else the XLA reference."""
    b, kvh, g, d = qg.shape
    t = k_cache.shape[1]
    bk = decode_tpu.BLOCK_K
    while bk >= 8 and t % bk:
        bk //= 2
    if not decode_tpu.supported(d) or bk < 8:
        return _reference_partials(qg, k_cache, v_cache, lengths, scale)
    gp = round_up(g, 8)
    acc, m, l = decode_tpu.tpu_decode_partials(
        pad_axis(qg, 2, gp), k_cache, v_cache, jnp.minimum(lengths.astype(jnp.int32), t), scale=scale,
        block_k=bk, interpret=interpret)
    return acc[:, :, None, :g], m[:, :, None, :g], l[:, :, None, :g]


def _combine(acc, m, l, qg, k_new, v_new, scale):
    """Merge split partials (and the new token, when given) by log-sum-exp rescaling → `[B, KV, G, D]` fp32."""
    if k_new is not None:  # the new token as one more split: score q.k_new, weight 1, value v_new
        s_new = jnp.einsum("bkgd,bkd->bkg", qg, k_new, preferred_element_type=jnp.float32) * scale
        v_b = jnp.broadcast_to(v_new.astype(jnp.float32)[:, :, None], qg.shape)
        acc = jnp.concatenate([acc, v_b[:, :, None]], axis=2)
        m = jnp.concatenate([m, s_new[:, :, None]], axis=2)
        l = jnp.concatenate([l, jnp.ones_like(s_new)[:, :, None]], axis=2)
    m_max = jnp.max(m, axis=2, keepdims=True)
    w = jnp.exp(m - m_max)
    num = jnp.sum(acc * w[..., None], axis=2)
    den = jnp.sum(l * w, axis=2)
    return jnp.where(den[..., None] > 0, num / jnp.maximum(den, 1e-30)[..., None], 0.0)


def decode_attention(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    lengths: jax.Array,
    *,
    k_new: Optional[jax.Array] = None,
    v_new: Optional[jax.Array] = None,
    sm_scale: Optional[float] = None,
    block_k: int = 64,
    num_splits: Optional[int] = None,
    backend: Optional[str] = None,
    interpret: Optional[bool] = None,
) -> jax.Array:
    """Attention of `q [B, H, D]` over `k_cache, v_cache [B, T, KV, D]` rows `< lengths [B]` (and over
    `k_new, v_new [B, KV, D]` when given: the token at position `lengths`, not written into the cache).

    Returns `[B, H, D]` in `q.dtype`. `num_splits` (GPU) defaults to enough splits for ~128 programs.
    `backend`: "auto" (per lowering platform), "gpu", "tpu" or "interpret" (see `kernels_pallas.common`);
    `block_k` is the GPU kernel's key block (the TPU kernel takes `decode_tpu.BLOCK_K` or the largest power of two
    dividing the cache length).
    """
    b, h, d = q.shape
    t, kvh = k_cache.shape[1], k_cache.shape[2]
    chex.assert_shape([k_cache, v_cache], (b, t, kvh, d))
    chex.assert_shape(lengths, (b,))
    if k_new is not None:
        chex.assert_shape([k_new, v_new], (b, kvh, d))
    check_head_dim(d)
    if h % kvh:
        raise ValueError(f"query heads {h} not a multiple of kv heads {kvh}")
    scale = d**-0.5 if sm_scale is None else float(sm_scale)
    backend = resolve_backend(backend)
    qg = q.reshape(b, kvh, h // kvh, d)

    def on(bk_name: str):
        interp = bk_name == "interpret" if interpret is None else interpret

        def run(qg, k_cache, v_cache, lengths, k_new, v_new):
            if bk_name == "tpu":
                parts = _tpu_partials(qg, k_cache, v_cache, lengths, scale, interp)
            else:
                parts = _gpu_partials(qg, k_cache, v_cache, lengths, scale, block_k, num_splits, interp)
            return _combine(*parts, qg, k_new, v_new, scale)
        return run

    args = (qg, k_cache, v_cache, lengths, k_new, v_new)
    out = platform_dispatch(on, *args) if backend == "auto" else on(backend)(*args)
    return out.reshape(b, h, d).astype(q.dtype)
