"""Flash attention kernels vs the XLA reference (CPU, Pallas interpret mode; tiny shapes).

Tolerances: fp32 inputs -> out/lse atol 2e-5, dq/dk/dv atol 5e-5 (fp32 accumulation
everywhere, so the only differences are summation order). bf16 inputs -> compared with the
fp32 reference on the same (bf16-rounded) inputs, atol 2e-2 on outputs and
3e-2 * max(1, |ref|_max) on gradients (bf16 P and dS before the matmuls).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from internlm2_jax.layers.attention_core import attention, make_attention_mask, xla_attention
from kernels_pallas import BlockSizes, decode_attention, flash_attention, flash_attention_fwd_with_lse

SMALL = BlockSizes(block_q=16, block_k=16, block_q_bwd=16, block_k_bwd=32)


def _inputs(b, s, h, kvh, d, dtype, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = jax.random.normal(ks[0], (b, s, h, d), jnp.float32).astype(dtype)
    k = jax.random.normal(ks[1], (b, s, kvh, d), jnp.float32).astype(dtype)
    v = jax.random.normal(ks[2], (b, s, kvh, d), jnp.float32).astype(dtype)
    ct = jax.random.normal(ks[3], (b, s, h, d), jnp.float32).astype(dtype)
    return q, k, v, ct


def _segments(b: int, s: int) -> jax.Array:
    """Several documents per row, with row-dependent boundaries."""
    rows = []
    for r in range(b):
        cuts = sorted({(s * 2) // 7 + r, s // 2, s - 3 - r})
        rows.append(np.searchsorted(np.array(cuts), np.arange(s), side="right"))
    return jnp.asarray(np.stack(rows), jnp.int32)


def _reference(q, k, v, seg, causal):
    """fp32 reference: out, lse [B, H, S], and the vjp function."""
    q32, k32, v32 = (x.astype(jnp.float32) for x in (q, k, v))
    s = q.shape[1]
    mask = make_attention_mask(s, s, q_segment_ids=seg, causal=causal)
    out, vjp = jax.vjp(lambda a, b_, c: xla_attention(a, b_, c, mask), q32, k32, v32)
    kvh = k.shape[2]
    qg = q32.reshape(q.shape[0], s, kvh, -1, q.shape[3])
    logits = jnp.einsum("bqkgd,btkd->bkgqt", qg, k32) * q.shape[-1] ** -0.5
    logits = jnp.where(mask[:, None, None], logits, -jnp.inf)
    lse = jax.nn.logsumexp(logits, axis=-1).reshape(q.shape[0], -1, s)
    return out, lse, vjp


def _check(q, k, v, ct, seg, causal, *, backend="interpret", block_sizes=SMALL):
    fp32 = q.dtype == jnp.float32
    interpret = True  # on this CPU; "tpu" runs the Mosaic kernels under TPU interpret mode
    out, lse = flash_attention_fwd_with_lse(q, k, v, segment_ids=seg, causal=causal,
                                            block_sizes=block_sizes, backend=backend, interpret=interpret)
    f = lambda a, b_, c: flash_attention(a, b_, c, segment_ids=seg, causal=causal,
                                         block_sizes=block_sizes, backend=backend, interpret=interpret)
    out2, vjp = jax.vjp(f, q, k, v)
    grads = vjp(ct)
    ref_out, ref_lse, ref_vjp = _reference(q, k, v, seg, causal)
    ref_grads = ref_vjp(ct.astype(jnp.float32))

    assert out.dtype == q.dtype and out.shape == q.shape
    assert lse.dtype == jnp.float32 and lse.shape == (q.shape[0], q.shape[2], q.shape[1])
    atol = 2e-5 if fp32 else 2e-2
    np.testing.assert_allclose(out.astype(jnp.float32), ref_out, atol=atol, rtol=0)
    np.testing.assert_allclose(out2.astype(jnp.float32), ref_out, atol=atol, rtol=0)
    np.testing.assert_allclose(lse, ref_lse, atol=atol, rtol=0)
    for name, g, r in zip("qkv", grads, ref_grads):
        assert g.dtype == q.dtype, name
        gtol = 5e-5 if fp32 else 3e-2 * max(1.0, float(jnp.abs(r).max()))
        np.testing.assert_allclose(g.astype(jnp.float32), r, atol=gtol, rtol=0, err_msg=f"d{name}")


# (batch, seq, heads, kv_heads, head_dim, dtype, causal, segments)
CASES = [
    (1, 37, 2, 2, 64, jnp.float32, True, False),  # G=1, odd length
    (2, 80, 4, 2, 128, jnp.float32, True, True),  # G=2, packed docs, D=128
    (1, 45, 4, 1, 64, jnp.float32, False, True),  # G=4, bidirectional + segments
    (1, 33, 6, 1, 64, jnp.float32, False, False),  # G=6
    (1, 50, 4, 1, 128, jnp.bfloat16, True, True),  # bf16, G=4
    (2, 29, 2, 1, 64, jnp.bfloat16, False, False),  # bf16, G=2
    (1, 24, 4, 2, 16, jnp.float32, True, True),  # head_dim 16 (tiny presets): zero-padded
]


@pytest.mark.parametrize("b,s,h,kvh,d,dtype,causal,segs", CASES)
def test_flash_matches_reference(b, s, h, kvh, d, dtype, causal, segs):
    q, k, v, ct = _inputs(b, s, h, kvh, d, dtype)
    _check(q, k, v, ct, _segments(b, s) if segs else None, causal)


def test_default_block_sizes_single_block():
    q, k, v, ct = _inputs(1, 20, 2, 1, 64, jnp.float32, seed=3)
    _check(q, k, v, ct, None, True, block_sizes=None)


@pytest.mark.parametrize("causal,segs", [(True, True), (False, False)])
def test_tpu_splash_backend_interpret(causal, segs):
    """Splash wrapper under `pltpu.force_tpu_interpret_mode()` (tiles padded to 128)."""
    q, k, v, ct = _inputs(1, 40, 4, 2, 64, jnp.float32, seed=1)
    _check(q, k, v, ct, _segments(1, 40) if segs else None, causal, backend="tpu", block_sizes=None)


def test_errors_name_the_problem():
    q, k, v, _ = _inputs(1, 16, 2, 1, 64, jnp.float32)
    with pytest.raises(ValueError, match="head_dim"):
        flash_attention(q[..., :36], k[..., :36], v[..., :36])
    with pytest.raises(ValueError, match="k and v shapes"):
        flash_attention(q, k, v[:, :8])
    with pytest.raises(ValueError, match="segment_ids"):
        flash_attention(q, k, v, segment_ids=jnp.zeros((1, 8), jnp.int32))
    with pytest.raises(ValueError, match="backend"):
        flash_attention(q, k, v, backend="cuda")


@pytest.mark.parametrize(
    "b,t,h,kvh,d,dtype,splits",
    [(3, 100, 6, 1, 64, jnp.float32, None), (2, 70, 8, 2, 128, jnp.bfloat16, 3)],
)
def test_decode_matches_reference(b, t, h, kvh, d, dtype, splits):
    ks = jax.random.split(jax.random.PRNGKey(5), 3)
    q = jax.random.normal(ks[0], (b, h, d), jnp.float32).astype(dtype)
    kc = jax.random.normal(ks[1], (b, t, kvh, d), jnp.float32).astype(dtype)
    vc = jax.random.normal(ks[2], (b, t, kvh, d), jnp.float32).astype(dtype)
    lengths = jnp.array([1, t - 13, t][:b], jnp.int32)
    out = decode_attention(q, kc, vc, lengths, block_k=16, num_splits=splits, backend="interpret")
    mask = make_attention_mask(1, t, causal=False, kv_lengths=lengths)
    f32 = lambda x: x.astype(jnp.float32)
    ref = xla_attention(f32(q)[:, None], f32(kc), f32(vc), mask)[:, 0]
    assert out.shape == q.shape and out.dtype == dtype
    np.testing.assert_allclose(f32(out), ref, atol=2e-5 if dtype == jnp.float32 else 2e-2, rtol=0)


@pytest.mark.parametrize("backend", ["interpret", "tpu"])
@pytest.mark.parametrize("with_new", [False, True])
def test_decode_with_the_new_token_matches_reference(backend, with_new):
    """The GPU kernel (interpreted) and the TPU Mosaic kernel (TPU interpret mode), with the token at position
    `lengths` passed apart from the cache (as a decode step does) or not; rows of length 0 and a full cache."""
    b, t, h, kvh, d = 3, 1024, 8, 2, 128
    ks = jax.random.split(jax.random.PRNGKey(7), 5)
    q = jax.random.normal(ks[0], (b, h, d))
    kc, vc = (jax.random.normal(k, (b, t, kvh, d)) for k in ks[1:3])
    kn, vn = (jax.random.normal(k, (b, kvh, d)) for k in ks[3:5])
    lengths = jnp.array([0, 517, t if not with_new else t - 1], jnp.int32)
    new = dict(k_new=kn, v_new=vn) if with_new else {}
    out = decode_attention(q, kc, vc, lengths, backend=backend, interpret=True, **new)
    if with_new:  # the reference reads a cache with the token written at `lengths`
        put = jax.vmap(lambda c, n, i: jax.lax.dynamic_update_slice(c, n[None], (i, 0, 0)))
        kc, vc, lengths = put(kc, kn, lengths), put(vc, vn, lengths), lengths + 1
    ref = xla_attention(q[:, None], kc, vc, make_attention_mask(1, t, causal=False, kv_lengths=lengths))[:, 0]
    if not with_new:
        ref = ref.at[0].set(0.0)  # a row with nothing to attend returns 0
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=0)


def test_attention_dispatch():
    q, k, v, _ = _inputs(1, 24, 4, 2, 64, jnp.float32, seed=2)
    seg = _segments(1, 24)
    ref = attention(q, k, v, segment_ids=seg, impl="xla")
    np.testing.assert_allclose(attention(q, k, v, segment_ids=seg, impl="pallas"), ref, atol=2e-5)
    if jax.default_backend() == "cpu":
        np.testing.assert_array_equal(attention(q, k, v, segment_ids=seg, impl="auto"), ref)
        with pytest.raises(ValueError, match="GPU"):
            attention(q, k, v, impl="cudnn")
    with pytest.raises(ValueError, match="attention_impl"):
        attention(q, k, v, impl="flash")
