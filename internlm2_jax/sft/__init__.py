"""Supervised fine-tuning: conversation formats, packing, LoRA / QLoRA (generation: `internlm2_jax.generate`).

  formats:  load_conversations / load_sft_examples / to_messages / tokenize_conversation / render_mask
  packing:  packed_batches (segment ids) / bucketed_batches (padding)
  lora:     LoraConfig / init_lora / apply_lora / merge_lora / quantize_int8
  lora_trainer: LoraTask (the one Trainer's LoRA task) / LoraTrainer (+ base placement, merged export) / make_lora_step
  data:     SFTDataConfig / make_train_iterator (resumable grain batches) / eval_prompts
  tasks:    generated toy chat tasks (add / reverse / repeat) + tokenizer
  train:    sft_train (the gin-configurable experiment; import it explicitly, it registers gin names)
"""

from internlm2_jax.sft.formats import (FormatError, LoadResult, load_conversations, load_sft_examples,
                                       parse_chatml, render_mask, to_messages, tokenize_conversation)
from internlm2_jax.sft.lora import LoraConfig, QuantizedWeight, apply_lora, init_lora, merge_lora, quantize_int8
from internlm2_jax.sft.lora_trainer import LoraTrainer, make_lora_step
from internlm2_jax.sft.packing import bucketed_batches, pack_rows, packed_batches

__all__ = [
    "FormatError", "LoadResult", "load_conversations", "load_sft_examples", "parse_chatml", "render_mask",
    "to_messages", "tokenize_conversation", "LoraConfig",
    "QuantizedWeight",
    "apply_lora", "init_lora", "make_lora_step", "merge_lora", "quantize_int8", "bucketed_batches",
    "pack_rows", "packed_batches", "LoraTrainer",
]
