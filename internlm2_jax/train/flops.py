"""Model FLOPs per token, device peak FLOP/s and model-FLOPs utilisation (MFU).

Conventions (PaLM appendix B / Megatron "model FLOPs", no rematerialisation counted):

* Every weight that takes part in a matmul costs 2 FLOPs per token in the forward pass and 4 in
  the backward pass (grad w.r.t. input and w.r.t. weight): `6 * N` per token, where `N` counts all
  parameters *except* the token-embedding table (a gather, not a matmul). The output head is a
  matmul and is counted. Norm scales are counted too (negligible, and it keeps `N` simple).
* Attention scores `Q K^T` and the weighted sum `P V` cost `2 * S * hd` FLOPs each per query
  head and query position for a full (bidirectional) `S x S` attention: forward `4 * L * H * hd * S`
  per token, times 3 for forward + backward = `12 * L * S * H * hd`. A causal mask lets a kernel
  skip the upper triangle, so we count **half** of that: `6 * L * S * H * hd` (what a flash kernel
  actually computes, and what PaLM/MaxText report as causal attention FLOPs).
"""

from __future__ import annotations

import jax

from internlm2_jax.config import ModelConfig
from internlm2_jax.model import param_count

# Dense bf16 peak FLOP/s per device (no sparsity), by substrings of `jax.Device.device_kind`.
# Order matters: the first substring found in the lower-cased device kind wins.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("h200", 989e12),
    ("h100", 989e12),  # SXM; the PCIe card is 756e12
    ("gh200", 989e12),
    ("b200", 2250e12),
    ("a100", 312e12),
    ("l40s", 362e12),
    ("a10g", 70e12),
    ("v100", 125e12),  # fp16 tensor cores
    ("tpu v6", 918e12),  # v6e (Trillium); device_kind "TPU v6 lite"
    ("tpu v5 lite", 197e12),  # v5e
    ("tpu v5e", 197e12),
    ("tpu v5p", 459e12),
    ("tpu v5", 459e12),  # v5p reports "TPU v5"
    ("tpu v4", 275e12),
    ("tpu v3", 123e12),
)


def non_embedding_params(config: ModelConfig) -> int:
    """Parameter count without the `[vocab, D]` embedding lookup table (output head included)."""
    return param_count(config) - config.vocab_size * config.hidden_size


def attention_flops_per_token(config: ModelConfig, seq_len: int, causal: bool = True) -> float:
    """Training (fwd + bwd) FLOPs per token of `QK^T` and `PV`: `12·L·S·H·hd`, halved when causal."""
    full = 12.0 * config.num_hidden_layers * seq_len * config.num_attention_heads * config.dim_per_head
    return full / 2 if causal else full


def flops_per_token(config: ModelConfig, seq_len: int, causal: bool = True) -> float:
    """Training FLOPs per token: `6·N` (N = non-embedding params) + causal attention (see module doc)."""
    return 6.0 * non_embedding_params(config) + attention_flops_per_token(config, seq_len, causal)


def peak_flops_per_device(device: jax.Device | None = None) -> float | None:
    """Dense bf16 peak FLOP/s of `device` (default: the first device), `None` if unknown (e.g. CPU)."""
    device = jax.devices()[0] if device is None else device
    if device.platform == "cpu":
        return None
    kind = device.device_kind.lower()
    for key, peak in PEAK_BF16_FLOPS:
        if key in kind:
            return peak
    return None


def mfu(tokens_per_s: float, config: ModelConfig, seq_len: int, num_devices: int, peak: float) -> float:
    """Model-FLOPs utilisation: achieved model FLOP/s over `num_devices * peak` (a fraction, not %)."""
    if peak <= 0 or num_devices <= 0:
        raise ValueError(f"peak ({peak}) and num_devices ({num_devices}) must be positive")
    return tokens_per_s * flops_per_token(config, seq_len) / (num_devices * peak)
