"""`layers.linear`: forward and gradients equal plain `jnp.einsum` under JAX autodiff."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from internlm2_jax.layers.linear import linear

SPECS = [
    ("bsd,df->bsf", (2, 3, 4), (4, 5)),
    ("bsd,dkgh->bskgh", (2, 3, 4), (4, 2, 3, 5)),
    ("bshd,hde->bse", (2, 3, 4, 5), (4, 5, 6)),
    ("bsd,bd->bs", (2, 3, 4), (2, 4)),  # a batch index in all three
]


@pytest.mark.parametrize("spec,xs,ws", SPECS)
def test_matches_einsum_autodiff(spec, xs, ws):
    kx, kw, kg = jax.random.split(jax.random.key(0), 3)
    x, w = jax.random.normal(kx, xs), jax.random.normal(kw, ws)
    out_shape = jnp.einsum(spec, x, w).shape
    probe = jax.random.normal(kg, out_shape)  # a random cotangent, via <out, probe>
    ref = jax.grad(lambda x, w: jnp.sum(jnp.einsum(spec, x, w) * probe), argnums=(0, 1))(x, w)
    got = jax.grad(lambda x, w: jnp.sum(linear(spec, x, w) * probe), argnums=(0, 1))(x, w)
    np.testing.assert_allclose(linear(spec, x, w), jnp.einsum(spec, x, w), rtol=1e-6, atol=1e-6)
    for r, g in zip(ref, got):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)


def test_mixed_precision_dtypes():
    x = jnp.ones((2, 3, 4), jnp.bfloat16)
    w = jnp.ones((4, 5), jnp.bfloat16)
    y = linear("bcd,dv->bcv", x, w, out_dtype=jnp.float32)
    assert y.dtype == jnp.float32
    dx, dw = jax.grad(lambda x, w: linear("bcd,dv->bcv", x, w, out_dtype=jnp.float32).sum(), argnums=(0, 1))(x, w)
    assert dx.dtype == dw.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(dw, np.float32), 6.0)  # each weight sees 2*3 ones


def test_rejects_spec_without_a_plain_backward():
    with pytest.raises(ValueError, match="index 's'"):
        linear("bsd,df->bf", jnp.ones((2, 3, 4)), jnp.ones((4, 5)))  # 's' summed away
    with pytest.raises(ValueError, match="index 'd'"):
        linear("bdd,df->bf", jnp.ones((2, 4, 4)), jnp.ones((4, 5)))  # a repeated (trace) index


def test_bf16_accumulates_in_fp32():
    """bf16 operands: forward and both gradients equal the fp32 math on the same (bf16-valued) inputs up to
    one final bf16 rounding (incl. the fp32 cotangent's), i.e. no bf16 accumulation over the 2048-long sums."""
    kx, kw, kg = jax.random.split(jax.random.key(1), 3)
    x = jax.random.normal(kx, (2, 1024, 2048)).astype(jnp.bfloat16)
    w = jax.random.normal(kw, (2048, 64)).astype(jnp.bfloat16)
    probe = jax.random.normal(kg, (2, 1024, 64))
    f32 = lambda a: np.asarray(a, np.float32)
    spec = "bsd,df->bsf"
    ref_y = jnp.einsum(spec, f32(x), f32(w))
    ref_dx, ref_dw = jax.grad(lambda a, b: jnp.sum(jnp.einsum(spec, a, b) * f32(probe.astype(jnp.bfloat16))),
                              argnums=(0, 1))(f32(x), f32(w))
    y = linear(spec, x, w)
    dx, dw = jax.grad(lambda a, b: jnp.sum(linear(spec, a, b, out_dtype=jnp.float32) * probe), argnums=(0, 1))(x, w)
    assert y.dtype == dx.dtype == dw.dtype == jnp.bfloat16
    for got, ref in ((y, ref_y), (dx, ref_dx), (dw, ref_dw)):
        err = np.abs(f32(got) - f32(ref)) / np.abs(f32(ref)).max()
        assert err.max() < 2**-8, err.max()  # one bf16 rounding of the largest entry
