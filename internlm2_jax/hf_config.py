"""HF InternLM2 `config.json` ⇄ `ModelConfig` fields, for configs written by transformers 4 and 5.

RoPE appears in several spellings: transformers 4 writes `"rope_theta": θ` and `"rope_scaling": {"type" or
"rope_type": "dynamic"|"linear", "factor": f}`; transformers 5 writes `"rope_parameters": {"rope_type": ...,
"factor": f, "rope_theta": θ}` and no `rope_scaling`. All are read; an unknown RoPE type, or two spellings that
disagree, is an error (never a silently different model). Missing optional keys take the values of InternLM2's
own `InternLM2Config` defaults (θ 10000, eps 1e-6, 2048 positions, biases on), not the released models' values.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Optional

from internlm2_jax.errors import ConfigValueError

ROPE_SCALING_TYPES = ("dynamic", "linear")
REQUIRED_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
# InternLM2Config's defaults for keys a config.json may omit.
HF_DEFAULTS = {"rope_theta": 10000.0, "rms_norm_eps": 1e-6, "max_position_embeddings": 2048, "bias": True,
               "tie_word_embeddings": False}
_INT_KEYS = REQUIRED_KEYS + ("num_key_value_heads", "max_position_embeddings", "bos_token_id", "eos_token_id",
                             "pad_token_id", "head_dim")
_FLOAT_KEYS = ("rms_norm_eps", "initializer_range")


class HFConfigError(ConfigValueError):
    """A `config.json` that cannot describe an InternLM2 model (the message names the file and key)."""


def read_hf_config(path: str | os.PathLike) -> tuple[dict[str, Any], str]:
    """`(config dict, where)` from a `config.json` path or its folder; bad JSON is an error naming the file."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"HF config not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HFConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise HFConfigError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config, path


def _rope_source(src: Any, key: str, where: str) -> tuple[Optional[dict[str, Any]], Optional[float]]:
    """`(scaling or None, theta or None)` of one `rope_scaling` / `rope_parameters` value."""
    if src is None:
        return None, None
    if not isinstance(src, dict):
        raise HFConfigError(f"{where}: {key} must be an object, got {src!r}")
    if src and all(isinstance(v, dict) for v in src.values()):
        raise HFConfigError(f"{where}: per-layer-type {key} ({sorted(src)}) are not supported by InternLM2")
    kind = src.get("rope_type", src.get("type"))
    if "type" in src and "rope_type" in src and src["type"] != src["rope_type"]:
        raise HFConfigError(f"{where}: {key} has type {src['type']!r} but rope_type {src['rope_type']!r}")
    theta = src.get("rope_theta")
    if kind in (None, "default"):
        return None, theta
    if kind not in ROPE_SCALING_TYPES:
        raise HFConfigError(f"{where}: {key} type {kind!r} is not supported; expected one of "
                            f"{ROPE_SCALING_TYPES} or 'default'")
    factor = src.get("factor")
    if not isinstance(factor, (int, float)) or isinstance(factor, bool) or not factor >= 1.0:
        raise HFConfigError(f"{where}: {key} factor must be a number >= 1, got {factor!r}")
    return {"type": kind, "factor": float(factor)}, theta


def rope_from_hf(hf: dict[str, Any], where: str = "config") -> tuple[float, Optional[dict[str, Any]]]:
    """`(rope_theta, rope_scaling)` from every spelling transformers 4 and 5 use (see module docstring)."""
    scaling, thetas = None, []
    seen: list[tuple[str, Optional[dict[str, Any]]]] = []
    for key in ("rope_parameters", "rope_scaling"):
        if key in hf:
            s, theta = _rope_source(hf[key], key, where)
            seen.append((key, s))
            if theta is not None:
                thetas.append((f"{key}.rope_theta", theta))
    if hf.get("rope_theta") is not None:
        thetas.append(("rope_theta", hf["rope_theta"]))
    given = [(k, s) for k, s in seen if hf[k] is not None]
    if len(given) == 2 and given[0][1] != given[1][1]:
        raise HFConfigError(f"{where}: rope_parameters {given[0][1]} and rope_scaling {given[1][1]} disagree")
    if given:
        scaling = given[0][1]
    for name, theta in thetas:
        if not isinstance(theta, (int, float)) or isinstance(theta, bool) or not theta > 0:
            raise HFConfigError(f"{where}: {name} must be a positive number, got {theta!r}")
    if len({float(t) for _, t in thetas}) > 1:
        raise HFConfigError(f"{where}: RoPE bases disagree: {dict(thetas)}")
    theta = float(thetas[0][1]) if thetas else HF_DEFAULTS["rope_theta"]
    return theta, scaling


def checkpoint_dtype(hf: dict[str, Any]) -> Optional[str]:
    """The checkpoint's dtype name from `dtype` (transformers 5) or `torch_dtype` (transformers 4), if any."""
    name = hf.get("dtype", hf.get("torch_dtype"))
    if isinstance(name, str) and name.startswith("torch."):
        name = name[len("torch."):]
    return name if isinstance(name, str) and name != "auto" else None


def model_kwargs_from_hf(hf: dict[str, Any], fields: set[str], where: str = "config") -> dict[str, Any]:
    """`ModelConfig` keyword arguments of an InternLM2 `config.json` dict (architecture only, no dtypes)."""
    if hf.get("model_type", "internlm2") != "internlm2":
        raise HFConfigError(f"{where}: model_type {hf['model_type']!r} is not an InternLM2 config")
    missing = [k for k in REQUIRED_KEYS if hf.get(k) is None]
    if missing:
        raise HFConfigError(f"{where}: missing required key {missing[0]!r}"
                            + (f" (and {missing[1:]})" if len(missing) > 1 else ""))
    kwargs = {k: v for k, v in {**HF_DEFAULTS, **hf}.items()
              if k in fields and k not in ("dtype", "param_dtype", "rope_theta", "rope_scaling")}
    if kwargs.get("num_key_value_heads") is None:
        kwargs["num_key_value_heads"] = hf["num_attention_heads"]  # InternLM2Config: MHA when absent
    if kwargs.get("head_dim") is None:
        kwargs.pop("head_dim", None)
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if k in kwargs and kwargs[k] is None:  # transformers 5 writes null pad ids: keep InternLM2's ids
            del kwargs[k]
    for k in _INT_KEYS:
        if k in kwargs and (not isinstance(kwargs[k], int) or isinstance(kwargs[k], bool) or kwargs[k] < 0):
            raise HFConfigError(f"{where}: {k} must be a non-negative integer, got {kwargs[k]!r}")
    for k in _FLOAT_KEYS:
        v = kwargs.get(k)
        if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v)):
            raise HFConfigError(f"{where}: {k} must be a finite number, got {v!r}")
    kwargs["rope_theta"], kwargs["rope_scaling"] = rope_from_hf(hf, where)
    return kwargs


def rope_to_hf(rope_theta: float, scaling: Optional[dict[str, Any]]) -> dict[str, Any]:
    """RoPE keys that transformers 4 (`rope_theta` + two-field `rope_scaling`, as InternLM2Config validates it)
    and transformers 5 (`rope_parameters`) both read with the same meaning."""
    if scaling is None:
        return {"rope_theta": rope_theta, "rope_scaling": None,
                "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta}}
    kind, factor = scaling.get("type", scaling.get("rope_type")), float(scaling["factor"])
    return {"rope_theta": rope_theta, "rope_scaling": {"type": kind, "factor": factor},
            "rope_parameters": {"rope_type": kind, "factor": factor, "rope_theta": rope_theta}}
