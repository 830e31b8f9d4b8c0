"""Model configuration: a frozen dataclass mirroring InternLM2's HF `config.json`, plus presets."""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional

import jax.numpy as jnp

from internlm2_jax.hf_config import (
    ROPE_SCALING_TYPES,
    HFConfigError,
    model_kwargs_from_hf,
    read_hf_config,
    rope_to_hf,
)

ATTENTION_IMPLS = ("xla", "pallas", "cudnn", "auto")
KERNEL_BACKENDS = ("auto", "gpu", "tpu", "interpret")  # = kernels_pallas.common.BACKENDS (no pallas import here)
REMAT_POLICIES = (
    "none",  # no rematerialization: keep every activation
    "full",  # recompute the whole block in the backward pass
    "minimal",  # save the weight projections' outputs (qkv, attn_out, mlp_gate, mlp_up, mlp_out)
    "save_qkv_attn",  # save the named qkv projections and attention outputs
    "save_qkv_attn_mlp",  # additionally save the ffn output
)


CONFIG_FIELDS_NOT_CHECKED = ("dtype", "param_dtype", "scan_layers", "scan_unroll", "remat_policy", "attention_impl",
                             "kernel_backend", "max_position_embeddings", "rope_theta", "rope_scaling")
"""Fields a checkpoint may legitimately differ in from the run's model config: compute choices, and the
context-length settings a long-context stage changes on purpose (RoPE base / scaling, max positions)."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of an InternLM2 decoder.

    Field names follow HF `InternLM2Config` where one exists. Dtypes may be given as strings
    (`"bfloat16"`) or jnp dtypes; use `compute_dtype`/`weight_dtype` to read them normalised.
    """

    vocab_size: int = 92544
    """Number of token ids (rows of `tok_embeddings`, columns of `output`)."""
    hidden_size: int = 4096
    """Model width `D`."""
    intermediate_size: int = 14336
    """SwiGLU hidden width `F` (w1/w3 output, w2 input)."""
    num_hidden_layers: int = 32
    """Number of decoder blocks."""
    num_attention_heads: int = 32
    """Query heads `H`."""
    num_key_value_heads: int = 8
    """Key/value heads `KV`; `H` must be a multiple of it (GQA group size `G = H // KV`)."""
    head_dim: Optional[int] = None
    """Per-head width; `None` means `hidden_size // num_attention_heads` (128 in every release)."""
    max_position_embeddings: int = 32768
    """Context length the model was trained for; dynamic NTK scaling starts above it."""
    rope_theta: float = 1_000_000.0
    """RoPE base."""
    rope_scaling: Optional[tuple[tuple[str, Any], ...]] = None
    """`(("type", "dynamic"|"linear"), ("factor", f))` or None. A dict is accepted and frozen."""
    rms_norm_eps: float = 1e-5
    """Epsilon inside RMSNorm's rsqrt."""
    bias: bool = False
    """Linear biases. Released InternLM2 models have none; only False is supported."""
    tie_word_embeddings: bool = False
    """Released models use an untied `output` head; only False is supported."""
    initializer_range: float = 0.02
    """Std of the normal initializer for fresh weights."""
    bos_token_id: int = 1
    """`<s>`."""
    eos_token_id: int = 2
    """`</s>`."""
    pad_token_id: int = 2
    """Padding id used by HF configs."""
    dtype: Any = "bfloat16"
    """Compute dtype of activations and matmuls (`float32` gives reference-exact results)."""
    param_dtype: Any = "float32"
    """Storage dtype of parameters (fp32 master weights by default)."""
    scan_layers: bool = True
    """Stack the blocks with `nn.scan` (one compiled block, params with a leading `layers` axis)."""
    scan_unroll: Optional[int] = None
    """With `scan_layers`: layers per iteration of the compiled loop (the params keep their stacked layout either
    way). `None`: every layer when tracing on a CPU host (XLA:CPU runs the rolled loop's stacked-parameter slicing
    and gradient accumulation 10-25 % slower; `docs/benchmarks.md`), 1 elsewhere (one compiled block: compile time
    independent of depth on GPU/TPU)."""
    remat_policy: str = "none"
    """Activation rematerialization policy, one of `REMAT_POLICIES`."""
    attention_impl: str = "xla"
    """`"xla"` (reference einsum), `"pallas"` (flash kernels), `"cudnn"`, or `"auto"` (the Pallas kernels when
    lowered for a GPU or TPU, XLA on CPU; chosen per lowering platform, so an export for `cuda` from a CPU host
    gets the kernels)."""
    kernel_backend: str = "auto"
    """Backend of the Pallas kernels: `"auto"` (per lowering platform: Triton for cuda/rocm, Mosaic for tpu, the
    interpreter on CPU), `"gpu"`, `"tpu"` (the compiled kernels, even when traced on a CPU host: for
    `jax.export`; running them on another platform fails at lowering) or `"interpret"` (CPU tests)."""

    def __post_init__(self) -> None:
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", tuple(sorted(self.rope_scaling.items())))
        if self.rope_scaling is not None:
            rs = dict(self.rope_scaling)
            kind = rs.get("type", rs.get("rope_type"))
            if kind not in ROPE_SCALING_TYPES:
                raise ValueError(
                    f"rope_scaling type {kind!r} is not supported; expected one of {ROPE_SCALING_TYPES}"
                )
            if float(rs.get("factor", 0)) < 1.0:
                raise ValueError(f"rope_scaling factor must be >= 1, got {rs.get('factor')!r}")
        if self.bias:
            raise ValueError("bias=True is not supported: released InternLM2 checkpoints have no biases")
        if self.tie_word_embeddings:
            raise ValueError("tie_word_embeddings=True is not supported: InternLM2 uses an untied output head")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by num_attention_heads={self.num_attention_heads}"
            )
        if self.scan_unroll is not None and self.scan_unroll < 1:
            raise ValueError(f"scan_unroll must be >= 1 or None, got {self.scan_unroll}")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy {self.remat_policy!r} unknown; expected one of {REMAT_POLICIES}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl {self.attention_impl!r} unknown; expected one of {ATTENTION_IMPLS}")
        if self.kernel_backend not in KERNEL_BACKENDS:
            raise ValueError(f"kernel_backend {self.kernel_backend!r} unknown; expected one of {KERNEL_BACKENDS}")
        jnp.dtype(self.dtype), jnp.dtype(self.param_dtype)  # raise early on bad dtype names

    # ---- derived quantities -------------------------------------------------------------------
    @property
    def dim_per_head(self) -> int:
        """Resolved head width."""
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def num_groups(self) -> int:
        """GQA group size `G = H // KV` (query heads per kv head)."""
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def weight_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.param_dtype)

    @property
    def rope_scaling_dict(self) -> Optional[dict[str, Any]]:
        return None if self.rope_scaling is None else dict(self.rope_scaling)

    # ---- HF interop ---------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, config: str | os.PathLike | dict, **overrides: Any) -> "ModelConfig":
        """Reads an HF InternLM2 `config.json` (path, folder or dict; transformers 4 or 5 spelling, see
        `internlm2_jax.hf_config`); `overrides` replace fields. Dtypes are not read here (see `load_hf`)."""
        where = "config"
        if not isinstance(config, dict):
            config, where = read_hf_config(config)
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = model_kwargs_from_hf(config, fields, where)
        kwargs.update(overrides)
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as e:
            raise HFConfigError(f"{where}: {e}") from None

    def to_hf(self) -> dict[str, Any]:
        """The HF InternLM2 `config.json` dict (remote-code architecture names included)."""
        return {
            "architectures": ["InternLM2ForCausalLM"],
            "auto_map": {
                "AutoConfig": "configuration_internlm2.InternLM2Config",
                "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM",
            },
            "model_type": "internlm2",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            **rope_to_hf(self.rope_theta, self.rope_scaling_dict),
            "rms_norm_eps": self.rms_norm_eps,
            "bias": False,
            "tie_word_embeddings": False,
            "initializer_range": self.initializer_range,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "attn_implementation": "eager",
            "torch_dtype": "bfloat16" if self.weight_dtype == jnp.bfloat16 else "float32",
            "dtype": "bfloat16" if self.weight_dtype == jnp.bfloat16 else "float32",  # transformers 5's key
            "use_cache": True,
        }


_RELEASE = dict(
    vocab_size=92544, max_position_embeddings=32768, rope_theta=1_000_000.0, rms_norm_eps=1e-5
)

PRESETS: dict[str, ModelConfig] = {
    "internlm2_1_8b": ModelConfig(
        num_hidden_layers=24, hidden_size=2048, intermediate_size=8192,
        num_attention_heads=16, num_key_value_heads=8, **_RELEASE),
    "internlm2_7b": ModelConfig(
        num_hidden_layers=32, hidden_size=4096, intermediate_size=14336,
        num_attention_heads=32, num_key_value_heads=8, **_RELEASE),
    "internlm2_20b": ModelConfig(
        num_hidden_layers=48, hidden_size=6144, intermediate_size=16384,
        num_attention_heads=48, num_key_value_heads=8, **_RELEASE),
    "internlm2_5_7b": ModelConfig(
        num_hidden_layers=32, hidden_size=4096, intermediate_size=14336,
        num_attention_heads=32, num_key_value_heads=8, **_RELEASE),
    "internlm2_5_20b": ModelConfig(
        num_hidden_layers=48, hidden_size=6144, intermediate_size=16384,
        num_attention_heads=48, num_key_value_heads=8,
        **{**_RELEASE, "rope_theta": 50_000_000.0, "max_position_embeddings": 262144}),
    # Tiny presets for tests and the CPU demo (GQA with G = 2 and G = 4).
    "tiny": ModelConfig(
        vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128),
    "tiny_g4": ModelConfig(
        vocab_size=384, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=64),
}


def get_preset(name: str, **overrides: Any) -> ModelConfig:
    """Returns preset `name` (see `PRESETS`) with `overrides` applied via `dataclasses.replace`."""
    if name not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)
