"""Pallas kernels for internlm2-jax: flash attention (GPU/Triton, TPU/splash) and decode attention."""

from kernels_pallas.common import DEFAULT_BLOCK_SIZES, BlockSizes
from kernels_pallas.decode_attention import decode_attention
from kernels_pallas.flash_attention import flash_attention, flash_attention_fwd_with_lse

__all__ = [
    "BlockSizes",
    "DEFAULT_BLOCK_SIZES",
    "decode_attention",
    "flash_attention",
    "flash_attention_fwd_with_lse",
]
