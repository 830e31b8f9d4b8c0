"""Frozen-base quantization for QLoRA: int8 per output channel, or blockwise absmax int4 (two per byte).

Both only touch the LoRA target weights (wqkv / wo / w1 / w2 / w3), whose dims split as `[*lead, *in, *out]`
(`IN_NDIM` / `OUT_NDIM`); everything else of the base stays as given. Dequantization is elementwise and
happens inside the loss (`lora.apply_lora`), so the stored base stays packed in HBM between steps.

int8 (`QuantizedWeight`): `w ≈ q · scale`, q int8 in [-127, 127], one fp32 absmax scale per output channel
(size-1 over the in dims). Error ≤ scale / 2 = absmax_channel / 254.

int4 (`Int4Weight`), symmetric blockwise absmax along the *last input dim* (`axis`; D for wqkv / w1 / w3,
F for w2, head_dim for wo), blocks of `block` consecutive weights (default 64 = `memory.QUANT_GROUP`; the
largest even divisor of that dim ≤ `block` when 64 does not divide it):

    scale_b = bf16(absmax_b / 7)            one bf16 per block (stored [..., n / block, ...] at `axis`)
    q       = clip(round(w / scale_b), -7, 7) ∈ [-7, 7], stored as the nibble q + 8 ∈ [1, 15]
    byte i  = nibble(2i) | nibble(2i + 1) << 4   along `axis` (uint8, that dim halved)

so |w − q · scale_b| ≤ scale_b / 2 ≈ absmax_b / 14 (the bf16 rounding of the scale leaves |w / scale_b| ≤
7 · (1 + 2⁻⁸) < 7.5, so the clip never adds error), and storage is 0.5 byte / weight + 2 / block bytes of
scales. Plain absmax int4 rather than NF4: no codebook gather, exact bound, same bytes.

Sharding: the packed q keeps the weight's rank and logical axes (its `axis` halved: adjacent pairs stay in
the same shard as long as each shard holds an even number of rows); the scale has the weight's axes with
None at `axis` (replicated along that mesh axis; it is 1/32 the size of q).
"""

from __future__ import annotations

from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

IN_NDIM = {"wqkv": 1, "wo": 2, "w1": 1, "w2": 1, "w3": 1}
OUT_NDIM = {"wqkv": 3, "wo": 1, "w1": 1, "w2": 1, "w3": 1}
INT4_BLOCK = 64


@flax.struct.dataclass
class QuantizedWeight:
    """int8 weight with per-output-channel fp32 absmax scales: `w ≈ q * scale`; scale has size-1 in dims."""

    q: jax.Array
    scale: jax.Array

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.q.shape)

    def dequantize(self, dtype: Any = jnp.float32) -> jax.Array:
        return (self.q.astype(jnp.float32) * self.scale).astype(dtype)


@flax.struct.dataclass
class Int4Weight:
    """Blockwise absmax int4, two nibbles per uint8 along `axis` (see the module doc).

    q: uint8 `[..., n / 2, ...]`; scale: bf16 `[..., n / block, ...]` (other dims as the weight's).
    """

    q: jax.Array
    scale: jax.Array
    axis: int = flax.struct.field(pytree_node=False, default=0)

    @property
    def shape(self) -> tuple[int, ...]:
        s = list(self.q.shape)
        s[self.axis] *= 2
        return tuple(s)

    @property
    def block(self) -> int:
        return self.shape[self.axis] // self.scale.shape[self.axis]

    def dequantize(self, dtype: Any = jnp.float32) -> jax.Array:
        ax = self.axis
        nib = jnp.stack([self.q & 0xF, self.q >> 4], axis=ax + 1).reshape(self.shape)
        scale = jnp.repeat(self.scale.astype(jnp.float32), self.block, axis=ax)
        return ((nib.astype(jnp.float32) - 8.0) * scale).astype(dtype)


def is_quantized(x: Any) -> bool:
    return isinstance(x, (QuantizedWeight, Int4Weight))


def dequantize(x: Any, dtype: Any = jnp.float32) -> Any:
    """Dequantized array for a quantized weight, `x` unchanged otherwise."""
    return x.dequantize(dtype) if is_quantized(x) else x


def _split(name: str, shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    n_out, n_in = OUT_NDIM[name], IN_NDIM[name]
    lead = len(shape) - n_out - n_in
    return tuple(shape[:lead]), tuple(shape[lead:lead + n_in]), tuple(shape[lead + n_in:])


def _map_targets(tree: Any, targets: tuple[str, ...], fn: Callable[[str, Any], Any], keep_others: bool) -> Any:
    """Rebuilds dict `tree`, applying `fn(name, leaf)` at target keys; drops other leaves unless `keep_others`."""
    out = {}
    for k, v in tree.items():
        if k in targets and not isinstance(v, dict):
            out[k] = fn(k, v)
        elif isinstance(v, dict):
            sub = _map_targets(v, targets, fn, keep_others)
            if sub or keep_others:
                out[k] = sub
        elif keep_others:
            out[k] = v
    return out


def int4_axis(name: str, ndim: int) -> int:
    """The packed / blocked dim of target `name` (its last input dim)."""
    return ndim - OUT_NDIM[name] - 1


def int4_block_size(n: int, block: int = INT4_BLOCK) -> int:
    """`block` if it divides `n`, else the largest even divisor of `n` below it."""
    if n % 2:
        raise ValueError(f"int4 packing needs an even input dim, got {n}")
    return max(b for b in range(2, min(block, n) + 1, 2) if n % b == 0)


def quantize_int8_weight(w: jax.Array, in_axes: tuple[int, ...]) -> QuantizedWeight:
    scale = jnp.maximum(jnp.max(jnp.abs(w.astype(jnp.float32)), axis=in_axes, keepdims=True), 1e-12) / 127.0
    return QuantizedWeight(jnp.clip(jnp.round(w / scale), -127, 127).astype(jnp.int8), scale)


def quantize_int4_weight(w: jax.Array, axis: int, block: int = INT4_BLOCK) -> Int4Weight:
    """Blockwise absmax int4 of `w` along `axis` (see the module doc)."""
    n = w.shape[axis]
    bs = int4_block_size(n, block)
    pre, post = w.shape[:axis], w.shape[axis + 1:]
    wf = w.astype(jnp.float32)
    absmax = jnp.max(jnp.abs(wf.reshape(*pre, n // bs, bs, *post)), axis=axis + 1)
    scale = (jnp.maximum(absmax, 1e-12) / 7.0).astype(jnp.bfloat16)
    q = jnp.clip(jnp.round(wf / jnp.repeat(scale.astype(jnp.float32), bs, axis=axis)), -7, 7)
    nib = (q + 8.0).astype(jnp.uint8).reshape(*pre, n // 2, 2, *post)
    lo, hi = jnp.take(nib, 0, axis=axis + 1), jnp.take(nib, 1, axis=axis + 1)
    return Int4Weight(lo | (hi << 4), scale, axis)


def quantize_int8(base_params: Any, targets: tuple[str, ...] = tuple(IN_NDIM)) -> Any:
    """QLoRA-style memory saving: target weights → `QuantizedWeight` (int8, per-output-channel absmax)."""
    def quant(name, w):
        lead, ins, _ = _split(name, w.shape)
        return quantize_int8_weight(w, tuple(range(len(lead), len(lead) + len(ins))))

    return _map_targets(nn.meta.unbox(base_params), targets, quant, keep_others=True)


def quantize_int4(base_params: Any, targets: tuple[str, ...] = tuple(IN_NDIM), block: int = INT4_BLOCK) -> Any:
    """QLoRA base: target weights → `Int4Weight` (blockwise absmax int4 along the last input dim)."""
    return _map_targets(nn.meta.unbox(base_params), targets,
                        lambda name, w: quantize_int4_weight(w, int4_axis(name, w.ndim), block), keep_others=True)


def quantize_base(base_params: Any, targets: tuple[str, ...], bits: int, block: int = INT4_BLOCK) -> Any:
    """`quantize_int4` (bits=4) or `quantize_int8` (bits=8)."""
    if bits == 4:
        return quantize_int4(base_params, targets, block)
    if bits == 8:
        return quantize_int8(base_params, targets)
    raise ValueError(f"qlora bits must be 4 or 8, got {bits}")
