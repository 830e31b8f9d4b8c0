"""TPU flash attention: a wrapper over `jax.experimental.pallas.ops.tpu.splash_attention`.

Mapping of our semantics onto splash:
  * GQA: q `[B, S, H, D]` -> `[B, KV, G, S, D]`; one splash *MQA* kernel (G heads sharing one
    k/v `[T, D]`) is vmapped over batch and kv heads, so K/V are never repeated.
  * causal -> `CausalMask`, otherwise `FullMask` (both lazy, per head via `MultiHeadMask`).
  * segment ids -> `SegmentIds(q, kv)`; padding tokens get `PAD_SEGMENT_ID`.
  * lengths that are not multiples of the tiles (>= 128 lanes) are padded and masked.
  * splash does not scale logits: q is pre-multiplied by `scale` (in fp32, cast back).
On CPU (tests) the Mosaic kernels run under `pltpu.force_tpu_interpret_mode()`, entered
for both the forward and the backward trace through a small `custom_vjp`.
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

from kernels_pallas.common import PAD_SEGMENT_ID, BlockSizes, fit_block, pad_axis, round_up

_LANES = 128


def _splash_kernel(g: int, sp: int, tp: int, causal: bool, bq: int, bk: int, bqb: int, bkb: int,
                   with_lse: bool):
    base = sm.CausalMask((sp, tp)) if causal else sm.FullMask((sp, tp))
    mask = sm.MultiHeadMask([base] * g)
    sizes = sk.BlockSizes(block_q=bq, block_kv=bk, block_kv_compute=bk, block_q_dkv=bqb,
                          block_kv_dkv=bkb, block_kv_dkv_compute=bkb, block_q_dq=bqb,
                          block_kv_dq=bkb)
    return sk.make_splash_mqa(mask, block_sizes=sizes, save_residuals=with_lse, head_shards=1,
                              q_seq_shards=1)


def _in_interpret_mode(fn: Callable) -> Callable:
    """Trace `fn` (and its VJP) under TPU interpret mode so it runs on CPU."""

    @jax.custom_vjp
    def wrapped(*args):
        with pltpu.force_tpu_interpret_mode():
            return fn(*args)

    def fwd(*args):
        with pltpu.force_tpu_interpret_mode():
            out, vjp_fn = jax.vjp(fn, *args)
        return out, vjp_fn

    def bwd(vjp_fn, ct):
        with pltpu.force_tpu_interpret_mode():
            return vjp_fn(ct)

    wrapped.defvjp(fwd, bwd)
    return wrapped


def splash_flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    segment_ids: Optional[jax.Array],
    causal: bool,
    scale: float,
    block_sizes: BlockSizes,
    interpret: bool,
    with_lse: bool,
):
    """q `[B, S, H, D]`, k/v `[B, T, KV, D]` -> out `[B, S, H, D]` (and lse `[B, H, S]`)."""
    b, s, h, d = q.shape
    t, kvh = k.shape[1], k.shape[2]
    g = h // kvh
    bq, bqb = (fit_block(x, s, _LANES) for x in (block_sizes.block_q, block_sizes.block_q_bwd))
    bk, bkb = (fit_block(x, t, _LANES) for x in (block_sizes.block_k, block_sizes.block_k_bwd))
    sp, tp = round_up(s, max(bq, bqb)), round_up(t, max(bk, bkb))
    kernel = _splash_kernel(g, sp, tp, causal, bq, bk, bqb, bkb, with_lse)

    qs = (q.astype(jnp.float32) * scale).astype(q.dtype)
    qs = pad_axis(qs, 1, sp).reshape(b, sp, kvh, g, d).transpose(0, 2, 3, 1, 4)  # [B,KV,G,Sp,D]
    kt = pad_axis(k, 1, tp).transpose(0, 2, 1, 3)  # [B, KV, Tp, D]
    vt = pad_axis(v, 1, tp).transpose(0, 2, 1, 3)
    seg = None
    if segment_ids is not None or sp != s or tp != t:
        ids = jnp.zeros((b, s), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
        seg = sk.SegmentIds(q=pad_axis(ids, 1, sp, PAD_SEGMENT_ID),
                            kv=pad_axis(ids, 1, tp, PAD_SEGMENT_ID) if t == s else
                            pad_axis(jnp.zeros((b, t), jnp.int32), 1, tp, PAD_SEGMENT_ID))

    def one(args):  # qq [G, Sp, D], kk/vv [Tp, D]: one (batch, kv head) pair
        qq, kk, vv, segb = args
        return kernel(qq, kk, vv, segment_ids=segb)

    if interpret:
        # TPU interpret mode cannot run a vmapped pallas_call (extra grid dim without
        # dimension semantics), so iterate over the B*KV pairs sequentially instead.
        def fn(qs, kt, vt, seg):
            rep = lambda x: None if x is None else jnp.repeat(x, kvh, axis=0)
            seg_f = None if seg is None else sk.SegmentIds(q=rep(seg.q), kv=rep(seg.kv))
            flat = lambda x: x.reshape(b * kvh, *x.shape[2:])
            res = jax.lax.map(one, (flat(qs), flat(kt), flat(vt), seg_f))
            return jax.tree.map(lambda x: x.reshape(b, kvh, *x.shape[1:]), res)

        fn = _in_interpret_mode(fn)
    else:
        per_batch = lambda qb, kb, vb, segb: jax.vmap(lambda a, c, e: one((a, c, e, segb)))(qb, kb, vb)
        fn = jax.vmap(per_batch)
    res = fn(qs, kt, vt, seg)
    out, lse = (res[0], res[1][0]) if with_lse else (res, None)
    out = out.transpose(0, 3, 1, 2, 4).reshape(b, sp, h, d)[:, :s].astype(q.dtype)
    if not with_lse:
        return out
    return out, lse.reshape(b, h, sp)[:, :, :s].astype(jnp.float32)
