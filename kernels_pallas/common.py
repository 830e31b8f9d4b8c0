"""Shared helpers for the flash-attention kernels: backends, block sizes, padding, masks."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

# Finite "minus infinity" (same value as the XLA reference): fully masked rows stay NaN-free.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
BACKENDS = ("auto", "gpu", "tpu", "interpret")
"""`gpu` (Pallas/Triton) and `tpu` (Pallas/Mosaic) are the compiled kernels, wherever the function is traced: a
lowering for that accelerator gets them even on a CPU host, and running them on another platform is an error from
the lowering, never an interpreter fallback. `interpret` runs the GPU kernels in Pallas' interpreter (CPU tests).
`auto` picks per lowering platform (`platform_dispatch`)."""
GPU_PLATFORMS = ("cuda", "rocm")
SUPPORTED_HEAD_DIMS = (64, 128)  # native tiles; other multiples of 8 up to 256 are zero-padded
MAX_HEAD_DIM = 256
# Segment id given to padding tokens; never equal to a real id (callers use ids >= 0).
PAD_SEGMENT_ID = -(2**31)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes. `block_q`/`block_k` drive the forward; `*_bwd` the dq and dk/dv kernels."""

    block_q: int = 128
    block_k: int = 64
    block_q_bwd: int = 64
    block_k_bwd: int = 64
    num_warps: Optional[int] = None  # GPU only; None picks 4 (D <= 64) or 8.
    num_stages: int = 2  # GPU only.


# Defaults per backend. TPU (splash) tiles must be multiples of 128 lanes.
DEFAULT_BLOCK_SIZES: dict[str, BlockSizes] = {
    "gpu": BlockSizes(block_q=128, block_k=64, block_q_bwd=64, block_k_bwd=64),
    "tpu": BlockSizes(block_q=512, block_k=512, block_q_bwd=256, block_k_bwd=256),
    "interpret": BlockSizes(block_q=32, block_k=32, block_q_bwd=32, block_k_bwd=32),
}


def resolve_backend(backend: Optional[str]) -> str:
    """`None` means `"auto"`; anything outside `BACKENDS` is an error."""
    backend = "auto" if backend is None else backend
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; expected one of {BACKENDS}")
    return backend


def platform_dispatch(by_backend: Callable[[str], Callable[..., Any]], *args: Any,
                      host: str = "interpret") -> Any:
    """Calls `by_backend(b)(*args)` with `b` chosen by the platform the computation is lowered for: "gpu" for
    cuda/rocm, "tpu" for tpu, `host` (e.g. "interpret", or a caller's XLA path) for anything else.

    The choice is made at lowering (`jax.lax.platform_dependent`), not from the host's default backend, so
    `jax.export(..., platforms=["cuda"])` on a CPU machine lowers the Triton kernels and the same trace run on
    the CPU uses `host`. Every branch is traced; only the target's is lowered.
    """
    branches = {"default": by_backend(host), "tpu": by_backend("tpu")}
    gpu = by_backend("gpu")
    branches.update({p: gpu for p in GPU_PLATFORMS})
    return jax.lax.platform_dependent(*args, **branches)


def resolve_block_sizes(backend: str, block_sizes: Optional[BlockSizes | dict]) -> BlockSizes:
    """Backend defaults, overridden by a `BlockSizes` or a dict of its fields."""
    base = DEFAULT_BLOCK_SIZES[backend]
    if block_sizes is None:
        return base
    if isinstance(block_sizes, BlockSizes):
        return block_sizes
    return dataclasses.replace(base, **dict(block_sizes))


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def fit_block(block: int, length: int, minimum: int = 16) -> int:
    """Shrink a power-of-two block to cover a short sequence with little padding."""
    return max(minimum, min(block, next_pow2(length)))


def round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def pad_axis(x: jax.Array, axis: int, new_len: int, value=0) -> jax.Array:
    """Pad `x` along `axis` at the end up to `new_len`."""
    extra = new_len - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def check_head_dim(d: int) -> None:
    if d % 8 or d > MAX_HEAD_DIM:
        raise ValueError(
            f"unsupported head_dim {d}: need a multiple of 8 up to {MAX_HEAD_DIM} "
            f"(native {SUPPORTED_HEAD_DIMS}, others are zero-padded to a power of two)"
        )


def padded_head_dim(d: int) -> int:
    """Power-of-two width the GPU kernels run at (zero columns do not change q.k or p.v)."""
    return max(16, next_pow2(d))


def check_qkv(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: Optional[jax.Array]) -> int:
    """Validate `[B,S,H,D]` / `[B,T,KV,D]` inputs; return the group size G = H // KV."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"expected rank-4 q/k/v, got {q.shape}, {k.shape}, {v.shape}")
    if k.shape != v.shape:
        raise ValueError(f"k and v shapes differ: {k.shape} vs {v.shape}")
    b, s, h, d = q.shape
    if k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"mismatched batch/head_dim: q {q.shape}, k {k.shape}")
    check_head_dim(d)
    if h % k.shape[2]:
        raise ValueError(f"query heads {h} not a multiple of kv heads {k.shape[2]}")
    if segment_ids is not None:
        if segment_ids.shape != (b, s) or s != k.shape[1]:
            raise ValueError(
                f"segment_ids {segment_ids.shape} must be [batch, seq] = {(b, s)} with q_len == kv_len"
            )
    return h // k.shape[2]


def block_mask(
    q_pos: jax.Array,
    k_pos: jax.Array,
    *,
    causal: bool,
    kv_len: Optional[int],
    q_seg: Optional[jax.Array],
    k_seg: Optional[jax.Array],
) -> Optional[jax.Array]:
    """Bool `[bq, bk]` keep-mask from positions `[bq]`, `[bk]` (None when nothing is masked)."""
    mask = None

    def _and(a, b):
        return b if a is None else jnp.logical_and(a, b)

    if causal:
        mask = _and(mask, q_pos[:, None] >= k_pos[None, :])
    if kv_len is not None:
        mask = _and(mask, jnp.broadcast_to(k_pos[None, :] < kv_len, (q_pos.shape[0], k_pos.shape[0])))
    if q_seg is not None:
        mask = _and(mask, q_seg[:, None] == k_seg[None, :])
    return mask
