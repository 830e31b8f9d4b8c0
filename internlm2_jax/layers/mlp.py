"""SwiGLU feed-forward: `w2(silu(w1(x)) * w3(x))` (w1 gate, w3 up, w2 down)."""

from __future__ import annotations

import flax.linen as nn
import jax
from jax.ad_checkpoint import checkpoint_name

from internlm2_jax.config import ModelConfig
from internlm2_jax.layers.linear import linear
from internlm2_jax.layers.params import constrain, logical_param


class FeedForward(nn.Module):
    """`[batch, seq, embed]` → `[batch, seq, embed]` through `[batch, seq, mlp]`."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        dt, d, f = cfg.compute_dtype, cfg.hidden_size, cfg.intermediate_size
        init = nn.initializers.normal(cfg.initializer_range)
        w1 = logical_param(self, "w1", init, (d, f), ("embed", "mlp"), cfg.weight_dtype)
        w3 = logical_param(self, "w3", init, (d, f), ("embed", "mlp"), cfg.weight_dtype)
        w2 = logical_param(self, "w2", init, (f, d), ("mlp", "embed"), cfg.weight_dtype)
        x = x.astype(dt)
        gate = checkpoint_name(linear("bsd,df->bsf", x, w1.astype(dt)), "mlp_gate")
        up = checkpoint_name(linear("bsd,df->bsf", x, w3.astype(dt)), "mlp_up")
        h = constrain(nn.silu(gate) * up, ("batch", "length", "mlp"))
        return checkpoint_name(linear("bsf,fd->bsd", h, w2.astype(dt)), "mlp_out")
