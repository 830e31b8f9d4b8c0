"""FlashAttention-2 forward / backward as Pallas kernels in the Triton (GPU) style.

Every function here takes *padded* inputs: `q [B, Sp, H, D]`, `k, v [B, Tp, KV, D]`, with
`Sp` a multiple of the q blocks and `Tp` of the kv blocks; `kv_len` (static) masks padded keys.
GQA is native: query head `h` reads kv head `h // G` through the BlockSpec index map, and the
dk/dv kernel visits the G query heads of its kv head in an inner loop (no repeated K/V).
The same kernels run on CPU with `interpret=True` (used by the tests).
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels_pallas.common import MASK_VALUE, block_mask


def _precision(dtype) -> Optional[lax.Precision]:
    # fp32 inputs: full-precision dots (no TF32), so fp32 results match the reference.
    return lax.Precision.HIGHEST if dtype == jnp.float32 else None


def _dot(a: jax.Array, b: jax.Array, trans_a: bool = False, trans_b: bool = False) -> jax.Array:
    return plgpu.dot(a, b, trans_a=trans_a, trans_b=trans_b, precision=_precision(a.dtype))


def _num_kv_blocks_causal(q_block_idx, bq: int, bk: int, nk: int):
    """kv blocks a causal q block must visit: ceil((i + 1) * bq / bk), capped at nk."""
    return jnp.minimum(lax.div((q_block_idx + 1) * bq + bk - 1, bk), nk)


def _fwd_kernel(q_ref, k_ref, v_ref, *refs, scale, causal, kv_len, bq, bk, has_seg):
    qs_ref, ks_ref, o_ref, lse_ref = refs if has_seg else (None, None, *refs)
    qi = pl.program_id(0)
    nk = k_ref.shape[0] // bk
    q = q_ref[...]  # [bq, D]
    q_pos = qi * bq + jnp.arange(bq)
    q_seg = qs_ref[...] if has_seg else None

    def body(kb, carry):
        acc, m, l = carry
        sl = pl.ds(kb * bk, bk)
        k, v = k_ref[sl, :], v_ref[sl, :]
        s = _dot(q, k, trans_b=True) * scale  # [bq, bk] fp32
        mask = block_mask(q_pos, kb * bk + jnp.arange(bk), causal=causal, kv_len=kv_len,
                          q_seg=q_seg, k_seg=ks_ref[sl] if has_seg else None)
        if mask is not None:
            s = jnp.where(mask, s, MASK_VALUE)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp(m - m_new)  # rescales the running sums
        p = jnp.exp(s - m_new[:, None])
        l = alpha * l + jnp.sum(p, axis=1)
        acc = alpha[:, None] * acc + _dot(p.astype(v.dtype), v)
        return acc, m_new, l

    upper = _num_kv_blocks_causal(qi, bq, bk, nk) if causal else nk
    init = (jnp.zeros(q.shape, jnp.float32), jnp.full((bq,), MASK_VALUE, jnp.float32),
            jnp.zeros((bq,), jnp.float32))
    acc, m, l = lax.fori_loop(0, upper, body, init)
    o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
    lse_ref[...] = m + jnp.log(l)


def _compiler_params(num_warps: Optional[int], num_stages: int, head_dim: int):
    warps = num_warps if num_warps is not None else (4 if head_dim <= 64 else 8)
    return plgpu.CompilerParams(num_warps=warps, num_stages=num_stages)


def gpu_forward(q, k, v, seg, *, scale: float, causal: bool, kv_len: Optional[int], bq: int,
                bk: int, num_warps: Optional[int], num_stages: int, interpret: bool):
    """Returns `o [B, Sp, H, D]` (q.dtype) and `lse [B, H, Sp]` fp32 (natural log)."""
    b, sp, h, d = q.shape
    tp, kvh = k.shape[1], k.shape[2]
    g = h // kvh
    has_seg = seg is not None
    kernel = functools.partial(_fwd_kernel, scale=scale, causal=causal, kv_len=kv_len, bq=bq,
                               bk=bk, has_seg=has_seg)
    in_specs = [
        pl.BlockSpec((None, bq, None, d), lambda i, bi, hi: (bi, i, hi, 0)),
        pl.BlockSpec((None, tp, None, d), lambda i, bi, hi: (bi, 0, hi // g, 0)),
        pl.BlockSpec((None, tp, None, d), lambda i, bi, hi: (bi, 0, hi // g, 0)),
    ]
    args = [q, k, v]
    if has_seg:
        in_specs += [pl.BlockSpec((None, bq), lambda i, bi, hi: (bi, i)),
                     pl.BlockSpec((None, tp), lambda i, bi, hi: (bi, 0))]
        args += [seg[0], seg[1]]
    return pl.pallas_call(
        kernel,
        grid=(sp // bq, b, h),
        in_specs=in_specs,
        out_specs=[pl.BlockSpec((None, bq, None, d), lambda i, bi, hi: (bi, i, hi, 0)),
                   pl.BlockSpec((None, None, bq), lambda i, bi, hi: (bi, hi, i))],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((b, h, sp), jnp.float32)],
        compiler_params=_compiler_params(num_warps, num_stages, d),
        interpret=interpret,
        name="flash_fwd",
    )(*args)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, scale, causal, kv_len,
               bq, bk, has_seg):
    qs_ref, ks_ref, dq_ref = refs if has_seg else (None, None, *refs)
    qi = pl.program_id(0)
    nk = k_ref.shape[0] // bk
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]
    q_pos = qi * bq + jnp.arange(bq)
    q_seg = qs_ref[...] if has_seg else None

    def body(kb, dq):
        sl = pl.ds(kb * bk, bk)
        k, v = k_ref[sl, :], v_ref[sl, :]
        s = _dot(q, k, trans_b=True) * scale
        mask = block_mask(q_pos, kb * bk + jnp.arange(bk), causal=causal, kv_len=kv_len,
                          q_seg=q_seg, k_seg=ks_ref[sl] if has_seg else None)
        if mask is not None:
            s = jnp.where(mask, s, MASK_VALUE)
        p = jnp.exp(s - lse[:, None])  # recomputed probabilities
        dp = _dot(do, v, trans_b=True)
        ds = p * (dp - delta[:, None])
        return dq + _dot(ds.astype(k.dtype), k)

    upper = _num_kv_blocks_causal(qi, bq, bk, nk) if causal else nk
    dq = lax.fori_loop(0, upper, body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, scale, causal, kv_len,
                bq, bk, g, has_seg):
    qs_ref, ks_ref, dk_ref, dv_ref = refs if has_seg else (None, None, *refs)
    kb = pl.program_id(0)
    nq = q_ref.shape[0] // bq
    k, v = k_ref[...], v_ref[...]  # [bk, D]
    k_pos = kb * bk + jnp.arange(bk)
    k_seg = ks_ref[...] if has_seg else None
    first_q = lax.div(kb * bk, bq) if causal else 0  # earlier q blocks see none of these keys

    def q_body(qb, carry, gi):
        dk, dv = carry
        sl = pl.ds(qb * bq, bq)
        q, do = q_ref[sl, gi, :], do_ref[sl, gi, :]
        lse, delta = lse_ref[gi, sl], delta_ref[gi, sl]
        s = _dot(q, k, trans_b=True) * scale  # [bq, bk]
        mask = block_mask(qb * bq + jnp.arange(bq), k_pos, causal=causal, kv_len=kv_len,
                          q_seg=qs_ref[sl] if has_seg else None, k_seg=k_seg)
        if mask is not None:
            s = jnp.where(mask, s, MASK_VALUE)
        p = jnp.exp(s - lse[:, None])
        dv = dv + _dot(p.astype(do.dtype), do, trans_a=True)
        dp = _dot(do, v, trans_b=True)
        ds = p * (dp - delta[:, None])
        dk = dk + _dot(ds.astype(q.dtype), q, trans_a=True)
        return dk, dv

    def g_body(gi, carry):  # the G query heads sharing this kv head
        return lax.fori_loop(first_q, nq, functools.partial(q_body, gi=gi), carry)

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(0, g, g_body, (zeros, zeros))
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def gpu_backward(q, k, v, seg, o, lse, do, *, scale: float, causal: bool,
                 kv_len: Optional[int], bq: int, bk: int, num_warps: Optional[int],
                 num_stages: int, interpret: bool):
    """FA2 backward on padded inputs: returns `dq, dk, dv` in the input dtypes."""
    b, sp, h, d = q.shape
    tp, kvh = k.shape[1], k.shape[2]
    g = h // kvh
    has_seg = seg is not None
    # delta_i = rowsum(dO_i * O_i), [B, H, Sp] fp32 (XLA fuses this elementwise pass).
    delta = jnp.einsum("bshd,bshd->bhs", do.astype(jnp.float32), o.astype(jnp.float32))
    common = dict(scale=scale, causal=causal, kv_len=kv_len, bq=bq, bk=bk, has_seg=has_seg)
    params = _compiler_params(num_warps, num_stages, d)

    # dq: grid over (q block, batch, q head); loops over kv blocks.
    q_spec = pl.BlockSpec((None, bq, None, d), lambda i, bi, hi: (bi, i, hi, 0))
    kv_spec = pl.BlockSpec((None, tp, None, d), lambda i, bi, hi: (bi, 0, hi // g, 0))
    row_spec = pl.BlockSpec((None, None, bq), lambda i, bi, hi: (bi, hi, i))
    in_specs = [q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec]
    args = [q, k, v, do, lse, delta]
    if has_seg:
        in_specs += [pl.BlockSpec((None, bq), lambda i, bi, hi: (bi, i)),
                     pl.BlockSpec((None, tp), lambda i, bi, hi: (bi, 0))]
        args += [seg[0], seg[1]]
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, **common),
        grid=(sp // bq, b, h), in_specs=in_specs, out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=params, interpret=interpret, name="flash_bwd_dq",
    )(*args)

    # dk/dv: grid over (kv block, batch, kv head); loops over the group's q heads and q blocks.
    qg_spec = pl.BlockSpec((None, sp, g, d), lambda j, bi, ki: (bi, 0, ki, 0))
    kv_blk = pl.BlockSpec((None, bk, None, d), lambda j, bi, ki: (bi, j, ki, 0))
    rows_g = pl.BlockSpec((None, g, sp), lambda j, bi, ki: (bi, ki, 0))
    in_specs = [qg_spec, kv_blk, kv_blk, qg_spec, rows_g, rows_g]
    args = [q, k, v, do, lse, delta]
    if has_seg:
        in_specs += [pl.BlockSpec((None, sp), lambda j, bi, ki: (bi, 0)),
                     pl.BlockSpec((None, bk), lambda j, bi, ki: (bi, j))]
        args += [seg[0], seg[1]]
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, g=g, **common),
        grid=(tp // bk, b, kvh), in_specs=in_specs, out_specs=[kv_blk, kv_blk],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=params, interpret=interpret, name="flash_bwd_dkv",
    )(*args)
    return dq, dk, dv
