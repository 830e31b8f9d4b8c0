"""Random tiny HF InternLM2 checkpoints written directly in torch layout (independent of hf_io)."""

from __future__ import annotations

import json
import os
from typing import Optional

import numpy as np
from safetensors.numpy import save_file

TINY_HF = {
    "architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2",
    "vocab_size": 160, "hidden_size": 64, "intermediate_size": 112, "num_hidden_layers": 2,
    "num_attention_heads": 8, "num_key_value_heads": 2, "hidden_act": "silu",
    "max_position_embeddings": 32, "rope_theta": 10000.0, "rope_scaling": None, "rms_norm_eps": 1e-5,
    "bias": False, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2,
}


def random_hf_tensors(cfg: dict, seed: int = 0, dtype=np.float32) -> dict[str, np.ndarray]:
    """Tensors of an InternLM2 checkpoint with the HF names and torch (out, in) layouts."""
    rng = np.random.default_rng(seed)
    d, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    h, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = d // h
    r = lambda *s, scale=0.08: (rng.standard_normal(s) * scale).astype(dtype)
    t = {"model.tok_embeddings.weight": r(v, d, scale=0.5), "output.weight": r(v, d),
         "model.norm.weight": (1 + r(d, scale=0.1)).astype(dtype)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        t[p + "attention.wqkv.weight"] = r((h + 2 * kv) * hd, d)
        t[p + "attention.wo.weight"] = r(d, h * hd)
        t[p + "feed_forward.w1.weight"] = r(f, d)
        t[p + "feed_forward.w3.weight"] = r(f, d)
        t[p + "feed_forward.w2.weight"] = r(d, f)
        t[p + "attention_norm.weight"] = (1 + r(d, scale=0.1)).astype(dtype)
        t[p + "ffn_norm.weight"] = (1 + r(d, scale=0.1)).astype(dtype)
    return t


def write_hf_checkpoint(path: str, cfg: dict, tensors: dict[str, np.ndarray], shards: int = 1) -> None:
    """Writes config.json and safetensors (an index when `shards > 1`)."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    names = list(tensors)
    if shards == 1:
        save_file(tensors, os.path.join(path, "model.safetensors"))
        return
    weight_map = {}
    for s in range(shards):
        fn = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[s::shards]}
        save_file(part, os.path.join(path, fn))
        weight_map.update({n: fn for n in part})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


def llama_state_dict(cfg: dict, t: dict[str, np.ndarray]):
    """De-interleaves InternLM2 tensors into a transformers LlamaForCausalLM state dict (torch)."""
    import torch

    d = cfg["hidden_size"]
    h, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd, g = d // h, h // kv
    sd = {"model.embed_tokens.weight": t["model.tok_embeddings.weight"], "model.norm.weight": t["model.norm.weight"],
          "lm_head.weight": t["output.weight"]}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        rows = t[p + "attention.wqkv.weight"]
        q_rows, k_rows, v_rows = [], [], []
        for grp in range(kv):  # rows of group grp: G query heads, one key head, one value head
            base = grp * (g + 2) * hd
            q_rows += [rows[base + j * hd: base + (j + 1) * hd] for j in range(g)]
            k_rows.append(rows[base + g * hd: base + (g + 1) * hd])
            v_rows.append(rows[base + (g + 1) * hd: base + (g + 2) * hd])
        sd[p + "self_attn.q_proj.weight"] = np.concatenate(q_rows)
        sd[p + "self_attn.k_proj.weight"] = np.concatenate(k_rows)
        sd[p + "self_attn.v_proj.weight"] = np.concatenate(v_rows)
        sd[p + "self_attn.o_proj.weight"] = t[p + "attention.wo.weight"]
        sd[p + "mlp.gate_proj.weight"] = t[p + "feed_forward.w1.weight"]
        sd[p + "mlp.up_proj.weight"] = t[p + "feed_forward.w3.weight"]
        sd[p + "mlp.down_proj.weight"] = t[p + "feed_forward.w2.weight"]
        sd[p + "input_layernorm.weight"] = t[p + "attention_norm.weight"]
        sd[p + "post_attention_layernorm.weight"] = t[p + "ffn_norm.weight"]
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}


def torch_llama(cfg: dict, tensors: dict[str, np.ndarray], rope_scaling: Optional[dict] = None):
    """transformers LlamaForCausalLM (fp32, eager) holding the de-interleaved weights."""
    from transformers import LlamaConfig

    lc = LlamaConfig(
        vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"], num_attention_heads=cfg["num_attention_heads"],
        num_key_value_heads=cfg["num_key_value_heads"], max_position_embeddings=cfg["max_position_embeddings"],
        rms_norm_eps=cfg["rms_norm_eps"], tie_word_embeddings=False, attention_bias=False,
        rope_parameters={"rope_type": "default", "rope_theta": cfg["rope_theta"]} if rope_scaling is None else
        {"rope_type": rope_scaling["type"], "factor": rope_scaling["factor"], "rope_theta": cfg["rope_theta"]},
    )
    return torch_llama_from_config(lc, cfg, tensors)


def torch_llama_from_config(lc, cfg: dict, tensors: dict[str, np.ndarray]):
    """LlamaForCausalLM (fp32, eager) for transformers config `lc` holding the de-interleaved weights."""
    import torch
    from transformers import LlamaForCausalLM

    lc._attn_implementation = "eager"
    model = LlamaForCausalLM(lc).eval().to(torch.float32)
    missing, unexpected = model.load_state_dict(llama_state_dict(cfg, tensors), strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    return model
