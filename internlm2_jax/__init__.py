"""internlm2-jax: the InternLM2 training stack in JAX/Flax.

Public API:
  load_hf(path) -> (ModelConfig, params)      read an HF InternLM2 checkpoint
  save_hf(config, params, path)               write one back (original tensor names)
  save_hf_llama(config, params, path)         export to the HF Llama layout
  forward(config, params, tokens, *, positions=None, segment_ids=None) -> logits [B, S, V]
  init_params, prefill, decode_step, init_cache, param_count
  generate(config, params, prompts, ...), generate_stream   KV-cache sampling (eval, RLHF rollouts, chat)
  ModelConfig, get_preset, PRESETS, Tokenizer
"""

from internlm2_jax.config import PRESETS, ModelConfig, get_preset
from internlm2_jax.hf_config import HFConfigError
from internlm2_jax.hf_io import CheckpointCorruptError, CheckpointMismatchError, load_hf, save_hf, save_hf_llama
from internlm2_jax.model import (
    abstract_params,
    decode_step,
    forward,
    hidden_states,
    init_cache,
    init_params,
    param_count,
    prefill,
)
from internlm2_jax.generate import generate, generate_stream
from internlm2_jax.tokenizer import Tokenizer

__all__ = [
    "PRESETS", "ModelConfig", "get_preset", "CheckpointCorruptError", "CheckpointMismatchError", "HFConfigError", "load_hf", "save_hf", "save_hf_llama",
    "abstract_params", "decode_step", "forward", "hidden_states", "init_cache", "init_params", "param_count",
    "prefill", "Tokenizer", "generate", "generate_stream",
]
__version__ = "0.1.0"
