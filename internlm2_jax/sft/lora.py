"""LoRA adapters on wqkv / wo / w1 / w2 / w3 with a frozen (optionally int4 / int8-quantized) base.

Adapters are a separate params tree mirroring the base tree down to each target weight, where the leaf
is `{"a": [*lead, in, r], "b": [*lead, r, *out]}` (`lead` = the scanned layer axis, `in` = the flattened
input dims, `out` = the weight's output dims; B starts at zero so the merged model equals the base).
Input / output dims per target (base shapes from `model.py`):

    wqkv [L, D, KV, G+2, hd]: in D,       out (KV, G+2, hd)
    wo   [L, H, hd, D]:       in (H·hd),  out D
    w1/w3 [L, D, F], w2 [L, F, D]: in the first, out the last

`apply_lora` materialises `W + (alpha / r) · A @ B` inside the loss, so `forward` is unchanged. That costs
one full-size weight per target per step (fine for small / medium models; a production path for big models
would apply `x @ A @ B` inside the layers instead). LoRA dropout is applied to A's input rows (a dropped
input feature for the whole batch, not per token) because the merged form has no per-token activations.

QLoRA bases (`quantize.py`): `quantize_base(params, targets, bits)` with `LoraConfig.qlora_bits` = 4 (default,
blockwise absmax int4 packed two per byte, `Int4Weight`; matches `train/memory.py`'s planner) or 8 (int8 per
output channel, `QuantizedWeight`). `apply_lora` dequantizes them inside the loss.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from internlm2_jax.sft.quantize import (IN_NDIM, INT4_BLOCK, OUT_NDIM, Int4Weight, QuantizedWeight,  # noqa: F401
                                        _map_targets, _split, dequantize, is_quantized, quantize_base,
                                        quantize_int4, quantize_int8)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("wqkv", "wo", "w1", "w2", "w3")
    qlora_bits: int = 4
    """Base precision under QLoRA: 4 (blockwise absmax int4, `Int4Weight`) or 8 (int8, `QuantizedWeight`)."""
    qlora_block: int = INT4_BLOCK
    """Weights per int4 scale (along each target's last input dim)."""

    def __post_init__(self):
        if self.qlora_bits not in (4, 8):
            raise ValueError(f"LoraConfig.qlora_bits must be 4 or 8, got {self.qlora_bits}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def init_lora(base_params: Any, cfg: LoraConfig, rng: jax.Array) -> dict:
    """Adapters for every target weight of `base_params` (A ~ N(0, 1/in), B = 0), fp32."""
    base_params = nn.meta.unbox(base_params)
    counter = iter(range(1 << 30))

    def make(name, w):
        shape = w.shape  # a QuantizedWeight / Int4Weight reports its unpacked shape
        lead, ins, outs = _split(name, shape)
        fan_in = int(np.prod(ins))
        a = jax.random.normal(jax.random.fold_in(rng, next(counter)), (*lead, fan_in, cfg.rank)) / np.sqrt(fan_in)
        return {"a": a.astype(jnp.float32), "b": jnp.zeros((*lead, cfg.rank, *outs), jnp.float32)}

    return _map_targets(base_params, cfg.targets, make, keep_others=False)


def lora_delta(name: str, w_shape: tuple[int, ...], ad: dict, scale: float,
               dropout_mask: Optional[jax.Array] = None) -> jax.Array:
    """`scale · A @ B` reshaped to the weight's shape `w_shape` (fp32)."""
    lead, ins, outs = _split(name, w_shape)
    a = ad["a"] if dropout_mask is None else ad["a"] * dropout_mask
    b = ad["b"].reshape(*lead, ad["b"].shape[len(lead)], -1)
    return (scale * jnp.matmul(a, b)).reshape(w_shape)


def apply_lora(base_params: Any, adapters: dict, alpha: float, rank: int, *, dropout: float = 0.0,
               rng: Optional[jax.Array] = None) -> Any:
    """Merged params `W + (alpha/rank)·A@B` for adapted weights (int4 / int8 bases dequantized), others as is.

    Differentiable in `adapters`; pass `rng` and `dropout > 0` for (row-wise) LoRA dropout in training.
    """
    counter = iter(range(1 << 30))

    def merge(tree, ads):
        out = {}
        for k, v in tree.items():
            if k in ads and not isinstance(v, dict):
                w = dequantize(v)
                mask = None
                if dropout > 0.0 and rng is not None:
                    keep = jax.random.bernoulli(jax.random.fold_in(rng, next(counter)), 1.0 - dropout,
                                                ads[k]["a"].shape[:-1] + (1,))
                    mask = keep.astype(jnp.float32) / (1.0 - dropout)
                out[k] = (w.astype(jnp.float32) + lora_delta(k, w.shape, ads[k], alpha / rank, mask)).astype(w.dtype)
            elif isinstance(v, dict):
                out[k] = merge(v, ads.get(k, {}))
            else:
                out[k] = dequantize(v)
        return out

    return merge(nn.meta.unbox(base_params), adapters)


def merge_lora(base_params: Any, adapters: dict, cfg: LoraConfig) -> Any:
    """Plain merged params for export / inference (no dropout), e.g. for `save_hf`."""
    return jax.jit(lambda p, a: apply_lora(p, a, cfg.alpha, cfg.rank))(nn.meta.unbox(base_params), adapters)
