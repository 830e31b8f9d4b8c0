"""Public flash-attention API: padding, backend dispatch and the `custom_vjp`.

Layouts follow `internlm2_jax.layers.attention_core`: `q [B, S, H, D]`, `k, v [B, T, KV, D]`,
query head `h` uses kv head `h // G`. Causal means query `i` attends keys `j <= i`.
Backends: "gpu" (Pallas/Triton kernels in `flash_gpu`), "interpret" (the same kernels with
`interpret=True`, for CPU), "tpu" (splash attention wrapper in `flash_tpu`), "auto" (one per lowering platform).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import chex
import jax
import jax.numpy as jnp

from kernels_pallas import flash_gpu
from kernels_pallas.common import (
    PAD_SEGMENT_ID,
    BlockSizes,
    check_qkv,
    fit_block,
    pad_axis,
    padded_head_dim,
    platform_dispatch,
    resolve_backend,
    resolve_block_sizes,
    round_up,
)


@dataclasses.dataclass(frozen=True)
class _Static:
    """Hashable static configuration of one padded kernel call."""

    scale: float
    causal: bool
    kv_len: Optional[int]  # set when kv was padded
    bq: int
    bk: int
    bq_bwd: int
    bk_bwd: int
    num_warps: Optional[int]
    num_stages: int
    interpret: bool


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash_padded(st: _Static, q, k, v, seg):
    out, lse = _fwd(st, q, k, v, seg)[0]
    return out, lse


def _fwd(st: _Static, q, k, v, seg):
    o, lse = flash_gpu.gpu_forward(
        q, k, v, seg, scale=st.scale, causal=st.causal, kv_len=st.kv_len, bq=st.bq, bk=st.bk,
        num_warps=st.num_warps, num_stages=st.num_stages, interpret=st.interpret)
    return (o, lse), (q, k, v, seg, o, lse)


def _bwd(st: _Static, res, cts):
    q, k, v, seg, o, lse = res
    do, _ = cts  # the lse output is for inspection only; its cotangent is ignored
    dq, dk, dv = flash_gpu.gpu_backward(
        q, k, v, seg, o, lse, do.astype(q.dtype), scale=st.scale, causal=st.causal,
        kv_len=st.kv_len, bq=st.bq_bwd, bk=st.bk_bwd, num_warps=st.num_warps,
        num_stages=st.num_stages, interpret=st.interpret)
    return dq, dk, dv, None


_flash_padded.defvjp(_fwd, _bwd)


def _gpu_style(q, k, v, segment_ids, *, causal, scale, bs: BlockSizes, interpret: bool):
    """Pad to whole blocks, run the Pallas/Triton kernels, slice back. Returns (out, lse)."""
    s, t, d = q.shape[1], k.shape[1], q.shape[3]
    dp = padded_head_dim(d)
    q, k, v = (pad_axis(x, 3, dp) for x in (q, k, v))
    bq, bq_bwd = fit_block(bs.block_q, s), fit_block(bs.block_q_bwd, s)
    bk, bk_bwd = fit_block(bs.block_k, t), fit_block(bs.block_k_bwd, t)
    sp, tp = round_up(s, max(bq, bq_bwd)), round_up(t, max(bk, bk_bwd))
    seg = None
    if segment_ids is not None:
        seg_i = segment_ids.astype(jnp.int32)
        seg = (pad_axis(seg_i, 1, sp, PAD_SEGMENT_ID), pad_axis(seg_i, 1, tp, PAD_SEGMENT_ID))
    st = _Static(scale=scale, causal=causal, kv_len=t if tp != t else None, bq=bq, bk=bk,
                 bq_bwd=bq_bwd, bk_bwd=bk_bwd, num_warps=bs.num_warps,
                 num_stages=bs.num_stages, interpret=interpret)
    out, lse = _flash_padded(st, pad_axis(q, 1, sp), pad_axis(k, 1, tp), pad_axis(v, 1, tp), seg)
    return out[:, :s, :, :d], lse[:, :, :s]


def flash_attention_fwd_with_lse(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    segment_ids: Optional[jax.Array] = None,
    causal: bool = True,
    sm_scale: Optional[float] = None,
    block_sizes: Optional[BlockSizes | dict] = None,
    backend: Optional[str] = None,
    interpret: Optional[bool] = None,
) -> tuple[jax.Array, jax.Array]:
    """Flash attention returning `(out [B, S, H, D], lse [B, H, S] fp32)`.

    Args:
      q: `[B, S, H, D]`, k/v: `[B, T, KV, D]` (bf16 or fp32; accumulation is fp32).
      segment_ids: `[B, S]` int (requires S == T); tokens attend only within their segment.
      causal: query `i` attends keys `j <= i`.
      sm_scale: softmax scale, default `D ** -0.5`.
      block_sizes: `BlockSizes` or a dict overriding the backend defaults.
      backend: "auto" (default: per lowering platform, see `common.platform_dispatch`), "gpu", "tpu" or
        "interpret".
      interpret: run the chosen kernels in Pallas' interpreter (default: only for backend "interpret"; `True`
        with "tpu" runs the Mosaic kernels under TPU interpret mode on CPU).
    The lse is `logsumexp_j(scale * q.k_j)` over the allowed keys (natural log).
    Differentiable w.r.t. q, k, v on gpu/interpret (the lse cotangent is dropped); on "tpu"
    this lse variant is forward-only (splash `save_residuals`); use `flash_attention` to train.
    """
    return _dispatch(q, k, v, segment_ids, causal, sm_scale, block_sizes, backend, interpret, with_lse=True)


def flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    segment_ids: Optional[jax.Array] = None,
    causal: bool = True,
    sm_scale: Optional[float] = None,
    block_sizes: Optional[BlockSizes | dict] = None,
    backend: Optional[str] = None,
    interpret: Optional[bool] = None,
) -> jax.Array:
    """Flash attention, `[B, S, H, D]` out in `q.dtype`; see `flash_attention_fwd_with_lse`."""
    return _dispatch(q, k, v, segment_ids, causal, sm_scale, block_sizes, backend, interpret, with_lse=False)


def _dispatch(q, k, v, segment_ids, causal, sm_scale, block_sizes, backend, interpret, *, with_lse: bool):
    check_qkv(q, k, v, segment_ids)
    scale = q.shape[-1] ** -0.5 if sm_scale is None else float(sm_scale)
    backend = resolve_backend(backend)

    def on(b: str):
        def run(q, k, v, segment_ids):
            return _one_backend(q, k, v, segment_ids, causal, scale, block_sizes, b,
                                b == "interpret" if interpret is None else interpret, with_lse)
        return run

    if backend == "auto":
        return platform_dispatch(on, q, k, v, segment_ids)
    return on(backend)(q, k, v, segment_ids)


def _one_backend(q, k, v, segment_ids, causal: bool, scale: float, block_sizes, backend: str, interpret: bool,
                 with_lse: bool):
    bs = resolve_block_sizes(backend, block_sizes)
    if backend == "tpu":
        from kernels_pallas import flash_tpu  # splash import is TPU-only machinery

        return flash_tpu.splash_flash_attention(
            q, k, v, segment_ids=segment_ids, causal=causal, scale=scale, block_sizes=bs,
            interpret=interpret, with_lse=with_lse)
    out, lse = _gpu_style(q, k, v, segment_ids, causal=causal, scale=scale, bs=bs, interpret=interpret)
    chex.assert_shape(lse, (q.shape[0], q.shape[2], q.shape[1]))
    return (out, lse) if with_lse else out
