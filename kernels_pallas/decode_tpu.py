"""TPU (Pallas/Mosaic) decode attention: one query token per row over a KV cache, GQA-native.

`tpu_decode_partials(q [B, KV, Gp, D], k_cache [B, T, KV, D], v_cache, lengths [B]) -> (acc, m, l)`, the
unnormalised softmax partials of the cache positions `< lengths[b]` (`decode_attention` combines them, with
the new token when it is not in the cache yet).

Layout, as in JetStream's ragged decode kernels: the grid is `(B, T // block_k)`, the second axis sequential.
The cache is viewed as `[B, T, KV * D]` (a free reshape), so a block `[block_k, KV * D]` has TPU-friendly
minor dimensions and kv head `h` is the lane slice `[h * D, (h + 1) * D)`, aligned for `D % 128 == 0` (every
released InternLM2). The block index is clamped to the row's last block through the scalar-prefetched lengths,
so blocks past a row's length are neither fetched again nor computed. The running max / sum live in VMEM
scratch replicated over 128 lanes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas.common import MASK_VALUE

LANES = 128
BLOCK_K = 512
"""Cache positions per grid step (a multiple of 8 sublanes; 512 x 8 heads x 128 x bf16 = 1 MiB per K/V block)."""


def supported(head_dim: int) -> bool:
    """Whether the kernel takes this head width (lane-aligned per-head slices)."""
    return head_dim % LANES == 0


def _kernel(len_ref, q_ref, k_ref, v_ref, acc_out, m_out, l_out, m_sc, l_sc, acc_sc, *, scale, bk, kvh, d):
    b, j = pl.program_id(0), pl.program_id(1)
    length = len_ref[b]

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, MASK_VALUE, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    @pl.when(j * bk < length)
    def _block():
        for h in range(kvh):  # static: KV <= 8 in InternLM2
            q = q_ref[h]  # [Gp, D]
            k = k_ref[:, h * d:(h + 1) * d]  # [bk, D]
            v = v_ref[:, h * d:(h + 1) * d]
            s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * scale
            pos = j * bk + lax.broadcasted_iota(jnp.int32, s.shape, 1)
            s = jnp.where(pos < length, s, MASK_VALUE)  # [Gp, bk]
            m_prev = m_sc[h][:, :1]
            m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
            alpha = jnp.exp(m_prev - m_new)
            p = jnp.exp(s - m_new)
            l_new = alpha * l_sc[h][:, :1] + jnp.sum(p, axis=1, keepdims=True)
            pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
            acc_sc[h] = alpha * acc_sc[h] + pv
            m_sc[h] = jnp.broadcast_to(m_new, m_sc.shape[1:])
            l_sc[h] = jnp.broadcast_to(l_new, l_sc.shape[1:])

    @pl.when(j == pl.num_programs(1) - 1)
    def _write():
        acc_out[...] = acc_sc[...]
        m_out[...] = m_sc[...]
        l_out[...] = l_sc[...]


def tpu_decode_partials(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, lengths: jax.Array, *,
                        scale: float, block_k: int = BLOCK_K, interpret: bool = False):
    """q `[B, KV, Gp, D]` (Gp a multiple of 8), k/v `[B, T, KV, D]`, lengths int32 `[B]` →
    acc `[B, KV, Gp, D]`, m `[B, KV, Gp]`, l `[B, KV, Gp]` (fp32; `l == 0` where a row's length is 0).
    `interpret=True` runs the Mosaic kernel in TPU interpret mode (CPU tests)."""
    b, kvh, gp, d = q.shape
    t = k_cache.shape[1]
    bk = min(block_k, t)
    if t % bk or bk % 8:
        raise ValueError(f"cache length {t} must be a multiple of the key block {bk} (itself a multiple of 8)")
    kf, vf = k_cache.reshape(b, t, kvh * d), v_cache.reshape(b, t, kvh * d)

    def kv_map(bi, j, lens):  # past the row's last block: stay on it (no new fetch)
        # lax.div, not //: the operand is >= 0, and floor division's sign fix-up needs the chip's generation
        return bi, jnp.minimum(j, lax.div(jnp.maximum(lens[bi] - 1, 0), bk)), 0

    row = lambda bi, j, lens: (bi, 0, 0, 0)  # noqa: E731
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1,
        grid=(b, t // bk),
        in_specs=[pl.BlockSpec((None, kvh, gp, d), row),
                  pl.BlockSpec((None, bk, kvh * d), kv_map),
                  pl.BlockSpec((None, bk, kvh * d), kv_map)],
        out_specs=[pl.BlockSpec((None, kvh, gp, d), row),
                   pl.BlockSpec((None, kvh, gp, LANES), row),
                   pl.BlockSpec((None, kvh, gp, LANES), row)],
        scratch_shapes=[pltpu.VMEM((kvh, gp, LANES), jnp.float32), pltpu.VMEM((kvh, gp, LANES), jnp.float32),
                        pltpu.VMEM((kvh, gp, d), jnp.float32)],
    )
    acc, m, l = pl.pallas_call(
        functools.partial(_kernel, scale=scale, bk=bk, kvh=kvh, d=d),
        grid_spec=grid_spec,
        out_shape=[jax.ShapeDtypeStruct((b, kvh, gp, d), jnp.float32),
                   jax.ShapeDtypeStruct((b, kvh, gp, LANES), jnp.float32),
                   jax.ShapeDtypeStruct((b, kvh, gp, LANES), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        interpret=pltpu.InterpretParams() if interpret else False,
        name="tpu_decode_attention",
    )(lengths.astype(jnp.int32), q, kf, vf)
    return acc, m[..., 0], l[..., 0]
