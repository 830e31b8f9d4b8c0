"""HF InternLM2 checkpoints ⇄ params, and export to the HF Llama layout."""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from typing import Any, Callable, Iterable, Optional

import flax.linen as nn
import jax
import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from internlm2_jax.checkpoint_integrity import ABSURD_MAGNITUDE
from internlm2_jax.errors import CheckpointCorruptError, CheckpointMismatchError  # noqa: F401 (re-exported)
from internlm2_jax.config import ModelConfig
from internlm2_jax.hf_config import checkpoint_dtype, read_hf_config, rope_to_hf
from internlm2_jax.model import Params, abstract_params

Tensors = dict[str, np.ndarray]
_LAYER_KEYS = ("attention.wqkv", "attention.wo", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3",
               "attention_norm", "ffn_norm")


def expected_hf_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Name → torch-layout shape of every tensor in an HF InternLM2 checkpoint."""
    d, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    qkv_rows = (config.num_attention_heads + 2 * config.num_key_value_heads) * config.dim_per_head
    shapes = {"model.tok_embeddings.weight": (v, d), "model.norm.weight": (d,), "output.weight": (v, d)}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "attention.wqkv.weight": (qkv_rows, d),
            p + "attention.wo.weight": (d, config.num_attention_heads * config.dim_per_head),
            p + "feed_forward.w1.weight": (f, d),
            p + "feed_forward.w3.weight": (f, d),
            p + "feed_forward.w2.weight": (d, f),
            p + "attention_norm.weight": (d,),
            p + "ffn_norm.weight": (d,),
        })
    return shapes


def _check_tensors(config: ModelConfig, names_shapes: dict[str, tuple[int, ...]], where: str) -> None:
    expected = expected_hf_shapes(config)
    missing = sorted(set(expected) - set(names_shapes))
    extra = sorted(n for n in set(names_shapes) - set(expected) if not n.endswith("rotary_emb.inv_freq"))
    bad = [(n, names_shapes[n], expected[n]) for n in sorted(expected) if n in names_shapes
           and tuple(names_shapes[n]) != expected[n]]
    if missing or extra or bad:
        parts = []
        if missing:
            parts.append(f"missing tensor {missing[0]} (expected shape {expected[missing[0]]})"
                         + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
        if extra:
            parts.append(f"unexpected tensor {extra[0]}" + (f" and {len(extra) - 1} more" if len(extra) > 1 else ""))
        if bad:
            n, got, exp = bad[0]
            parts.append(f"tensor {n} has shape {tuple(got)}, expected {exp}")
        raise CheckpointMismatchError(f"{where}: " + "; ".join(parts))


# ---- per-layer conversions (torch layout ⇄ ours) ---------------------------------------------------

def _layer_from_hf(config: ModelConfig, t: Callable[[str], np.ndarray]) -> dict:
    kvh, g, hd, d = config.num_key_value_heads, config.num_groups, config.dim_per_head, config.hidden_size
    wqkv = t("attention.wqkv").reshape(kvh, g + 2, hd, d).transpose(3, 0, 1, 2)
    wo = t("attention.wo").T.reshape(kvh * g, hd, d)
    return {
        "attention": {"wqkv": wqkv, "wo": wo},
        "attention_norm": {"scale": t("attention_norm")},
        "feed_forward": {"w1": t("feed_forward.w1").T, "w3": t("feed_forward.w3").T, "w2": t("feed_forward.w2").T},
        "ffn_norm": {"scale": t("ffn_norm")},
    }


def _layer_to_hf(config: ModelConfig, layer: dict) -> dict[str, np.ndarray]:
    d = config.hidden_size
    a, ff = layer["attention"], layer["feed_forward"]
    return {
        "attention.wqkv": a["wqkv"].transpose(1, 2, 3, 0).reshape(-1, d),
        "attention.wo": a["wo"].reshape(-1, d).T,
        "feed_forward.w1": ff["w1"].T, "feed_forward.w3": ff["w3"].T, "feed_forward.w2": ff["w2"].T,
        "attention_norm": layer["attention_norm"]["scale"], "ffn_norm": layer["ffn_norm"]["scale"],
    }


def _layers(config: ModelConfig, params: dict) -> list[dict]:
    """Per-layer param dicts of scanned or unscanned params."""
    if config.scan_layers:
        return [jax.tree.map(lambda x: x[i], params["layers"]) for i in range(config.num_hidden_layers)]
    return [params[f"layers_{i}"] for i in range(config.num_hidden_layers)]


def hf_to_params(config: ModelConfig, get: Callable[[str], np.ndarray]) -> dict:
    """Plain (unboxed) params from a tensor getter `get(hf_name) -> np.ndarray` (torch layout)."""
    layers = [_layer_from_hf(config, lambda k, i=i: get(f"model.layers.{i}.{k}.weight"))
              for i in range(config.num_hidden_layers)]
    params: dict[str, Any] = {
        "tok_embeddings": get("model.tok_embeddings.weight"),
        "norm": {"scale": get("model.norm.weight")},
        "output": get("output.weight").T,
    }
    if config.scan_layers:
        params["layers"] = jax.tree.map(lambda *xs: np.stack(xs), *layers)
    else:
        params.update({f"layers_{i}": layer for i, layer in enumerate(layers)})
    return params


def params_to_hf(config: ModelConfig, params: Params) -> Tensors:
    """HF InternLM2 tensors (torch layout, original names) from params (boxed or not)."""
    p = jax.tree.map(np.asarray, nn.meta.unbox(params))
    out: Tensors = {"model.tok_embeddings.weight": p["tok_embeddings"], "model.norm.weight": p["norm"]["scale"],
                    "output.weight": p["output"].T}
    for i, layer in enumerate(_layers(config, p)):
        for k, v in _layer_to_hf(config, layer).items():
            out[f"model.layers.{i}.{k}.weight"] = v
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def box_like(config: ModelConfig, plain: dict) -> Params:
    """Attaches the model's logical axis names to a plain params tree."""
    abstract = abstract_params(config)
    return jax.tree.map(lambda box, x: box.replace_boxed(x), abstract, plain,
                        is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


# ---- reading checkpoints ---------------------------------------------------------------------------

class _TensorReader:
    """Lazily reads tensors from `*.safetensors` (index-sharded or single) or `pytorch_model*.bin`."""

    def __init__(self, path: str):
        self.files: dict[str, str] = {}
        index = os.path.join(path, "model.safetensors.index.json")
        st_files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
        bin_files = sorted(glob.glob(os.path.join(path, "pytorch_model*.bin")))
        self._torch: Optional[dict] = None
        self._torch_files: dict[str, str] = {}
        self._handles: dict[str, Any] = {}
        if os.path.exists(index):
            try:
                with open(index, encoding="utf-8") as f:
                    weight_map = json.load(f)["weight_map"]
                items = list(weight_map.items())
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
                raise CheckpointCorruptError(f"{index}: not a safetensors index ({type(e).__name__}: {e})") from None
            for name, fn in items:
                full = os.path.join(path, fn)
                if not os.path.exists(full):
                    raise FileNotFoundError(f"{index} lists {fn} for {name}, but the file is missing")
                self.files[name] = full
        elif st_files:
            for fn in st_files:
                self.files.update({k: fn for k in self._handle(fn).keys()})
        elif bin_files:
            self._torch = self._load_torch(bin_files)
        else:
            raise FileNotFoundError(f"no *.safetensors or pytorch_model*.bin checkpoint in {path}")

    def _load_torch(self, files: Iterable[str]) -> dict:
        try:
            import torch
        except ImportError as e:
            raise ImportError("reading pytorch_model*.bin needs torch; install it or convert to safetensors") from e
        out = {}
        for fn in files:
            try:
                state = torch.load(fn, map_location="cpu", weights_only=True)
            except Exception as e:  # torch raises many types for a truncated or foreign file
                raise CheckpointCorruptError(f"{fn}: not a readable torch checkpoint ({type(e).__name__}: "
                                             f"{str(e).splitlines()[0] if str(e) else ''})") from None
            for k, v in state.items():
                self._torch_files[k] = fn
                if v.dtype == torch.bfloat16:
                    out[k] = v.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
                else:
                    out[k] = v.numpy()
        return out

    def shapes(self) -> dict[str, tuple[int, ...]]:
        if self._torch is not None:
            return {k: v.shape for k, v in self._torch.items()}
        out = {}
        for name, fn in self.files.items():
            try:
                out[name] = tuple(self._handle(fn).get_slice(name).get_shape())
            except Exception as e:  # safetensors raises its own error type for names missing from a shard
                raise CheckpointCorruptError(f"{fn}: cannot read tensor {name} ({e})") from None
        return out

    def _handle(self, fn: str):
        if fn not in self._handles:
            try:
                self._handles[fn] = safe_open(fn, "np")
            except Exception as e:  # SafetensorError / OSError for truncated or garbage files
                raise CheckpointCorruptError(f"{fn}: not a readable safetensors file ({e})") from None
        return self._handles[fn]

    def file_of(self, name: str) -> str:
        return self._torch_files.get(name, "") if self._torch is not None else self.files[name]

    def get(self, name: str) -> np.ndarray:
        if self._torch is not None:
            return self._torch[name]
        try:
            return self._handle(self.files[name]).get_tensor(name)
        except CheckpointCorruptError:
            raise
        except Exception as e:
            raise CheckpointCorruptError(f"{self.files[name]}: cannot read tensor {name} ({e})") from None

    def get_checked(self, name: str, dtype: np.dtype, check_finite: bool) -> np.ndarray:
        """Tensor `name` cast to `dtype`; NaN/inf values are an error naming the file and tensor."""
        x = self.get(name)
        if check_finite and not np.isfinite(x).all():
            bad = int(x.size - np.isfinite(x).sum())
            raise CheckpointCorruptError(f"{self.file_of(name)}: tensor {name} has {bad} non-finite values "
                                         f"(NaN/inf) of {x.size}")
        if check_finite and x.size and float(np.max(np.abs(x.astype(np.float32)))) > ABSURD_MAGNITUDE:
            raise CheckpointCorruptError(f"{self.file_of(name)}: tensor {name} holds absurd values (max |x| = "
                                         f"{float(np.max(np.abs(x.astype(np.float32)))):.3g}); a corrupt file?")
        return x.astype(dtype, copy=False)


def load_hf(path: str | os.PathLike, *, param_dtype: Any = None, dtype: Any = None, check_finite: bool = True,
            **config_overrides: Any) -> tuple[ModelConfig, Params]:
    """Loads an HF InternLM2 checkpoint folder → `(ModelConfig, params)`.

    Params keep the checkpoint's dtype unless `param_dtype` is given (e.g. `"float32"` master weights).
    The compute `dtype` defaults to the checkpoint's own (`dtype` / `torch_dtype` in `config.json`, else its
    tensors' dtype), so `load_hf(save_hf(x))` computes exactly like `x` for an fp32 checkpoint; pass
    `dtype="bfloat16"` to override. `config_overrides` replace other `ModelConfig` fields (`scan_layers`, ...).
    `check_finite` rejects tensors holding NaN/inf.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"HF checkpoint folder not found: {path}")
    config = ModelConfig.from_hf(path, **config_overrides)  # errors name the config.json
    hf, _ = read_hf_config(path)
    reader = _TensorReader(path)
    _check_tensors(config, reader.shapes(), path)
    ckpt_dtype = np.dtype(reader.get("model.norm.weight").dtype).name
    config = dataclasses.replace(config, param_dtype=param_dtype or ckpt_dtype,
                                 dtype=dtype or checkpoint_dtype(hf) or ckpt_dtype)
    target = np.dtype(config.weight_dtype)
    plain = hf_to_params(config, lambda n: reader.get_checked(n, target, check_finite))
    return config, box_like(config, jax.tree.map(jax.numpy.asarray, plain))


# ---- writing checkpoints ---------------------------------------------------------------------------

def _write_sharded(tensors: Tensors, path: str, max_shard_bytes: int, metadata: dict[str, str]) -> None:
    os.makedirs(path, exist_ok=True)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, arr in tensors.items():
        if shards[-1] and size + arr.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = arr
        size += arr.nbytes
    if len(shards) == 1:
        save_file(shards[0], os.path.join(path, "model.safetensors"), metadata=metadata)
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        fn = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(path, fn), metadata=metadata)
        weight_map.update({k: fn for k in shard})
    total = sum(a.nbytes for a in tensors.values())
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def save_hf(config: ModelConfig, params: Params, path: str | os.PathLike, *,
            max_shard_bytes: int = 5 * 2**30) -> None:
    """Writes an HF InternLM2 checkpoint (`config.json` + safetensors, original tensor names)."""
    path = os.fspath(path)
    tensors = params_to_hf(config, params)
    _check_tensors(config, {k: v.shape for k, v in tensors.items()}, "params")
    _write_sharded(tensors, path, max_shard_bytes, {"format": "pt"})
    hf = config.to_hf()
    hf["torch_dtype"] = hf["dtype"] = np.dtype(tensors["model.norm.weight"].dtype).name
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)


def save_hf_llama(config: ModelConfig, params: Params, path: str | os.PathLike, *,
                  max_shard_bytes: int = 5 * 2**30) -> None:
    """Writes an HF **Llama** checkpoint (de-interleaved q/k/v, gate/up/down) loadable without remote code."""
    path = os.fspath(path)
    src = params_to_hf(config, params)
    kvh, g, hd, d = config.num_key_value_heads, config.num_groups, config.dim_per_head, config.hidden_size
    out: Tensors = {"model.embed_tokens.weight": src["model.tok_embeddings.weight"],
                    "model.norm.weight": src["model.norm.weight"], "lm_head.weight": src["output.weight"]}
    for i in range(config.num_hidden_layers):
        p, q = f"model.layers.{i}.", f"model.layers.{i}."
        wqkv = src[p + "attention.wqkv.weight"].reshape(kvh, g + 2, hd, d)
        out.update({
            q + "self_attn.q_proj.weight": wqkv[:, :g].reshape(kvh * g * hd, d),
            q + "self_attn.k_proj.weight": wqkv[:, g].reshape(kvh * hd, d),
            q + "self_attn.v_proj.weight": wqkv[:, g + 1].reshape(kvh * hd, d),
            q + "self_attn.o_proj.weight": src[p + "attention.wo.weight"],
            q + "mlp.gate_proj.weight": src[p + "feed_forward.w1.weight"],
            q + "mlp.up_proj.weight": src[p + "feed_forward.w3.weight"],
            q + "mlp.down_proj.weight": src[p + "feed_forward.w2.weight"],
            q + "input_layernorm.weight": src[p + "attention_norm.weight"],
            q + "post_attention_layernorm.weight": src[p + "ffn_norm.weight"],
        })
    out = {k: np.ascontiguousarray(v) for k, v in out.items()}
    _write_sharded(out, path, max_shard_bytes, {"format": "pt"})
    rope_scaling = config.rope_scaling_dict
    hf = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": config.vocab_size, "hidden_size": d, "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers, "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": kvh, "head_dim": hd, "hidden_act": "silu",
        "max_position_embeddings": config.max_position_embeddings, "rms_norm_eps": config.rms_norm_eps,
        **rope_to_hf(config.rope_theta, rope_scaling),
        "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False,
        "bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
        "torch_dtype": np.dtype(out["model.norm.weight"].dtype).name,
        "dtype": np.dtype(out["model.norm.weight"].dtype).name,
    }
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)
