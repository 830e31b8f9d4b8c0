"""RMSNorm as in InternLM2: normalise in fp32, cast back, then scale."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from internlm2_jax.layers.params import logical_param


class RMSNorm(nn.Module):
    """`weight * cast(x * rsqrt(mean(x²) + eps))` over the last dim of `[..., embed]`."""

    eps: float = 1e-5
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = logical_param(self, "scale", nn.initializers.ones, (x.shape[-1],), ("norm",), self.param_dtype)
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return y.astype(self.dtype) * scale.astype(self.dtype)
