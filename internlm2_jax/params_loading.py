"""The one place that loads model params from disk and places them on a mesh.

Sources (`path`):
  * an HF InternLM2 folder (has `config.json`), via `internlm2_jax.load_hf`, checked against the model config;
  * an Orbax workdir or checkpoint dir of ours (`<dir>/checkpoints/<step>/state` or `<dir>/<step>/state`):
    pretraining / SFT / RM / DPO (`TrainState`: params under `params`), PPO / GRPO / RLOO (`RLState`: actor
    under `actor_state.params`, critic under `critic_state.params`) or `save_params_orbax` below; restored
    straight onto the target shardings (never whole on one host);
  * a `.msgpack` file (`save_msgpack`), e.g. a small RM or a legacy actor.
Placement is `jax.make_array_from_callback` for host arrays (each process builds only its own shards) and
`jax.device_put` (a reshard) for device arrays; never `np.asarray` of a global array.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional

import flax.linen as nn
import jax
import numpy as np
from flax import serialization

from internlm2_jax.checkpointing import CheckpointConfig, Checkpointer, load_parameters_only, state_tree
from internlm2_jax.config import CONFIG_FIELDS_NOT_CHECKED, ModelConfig
from internlm2_jax.errors import CheckpointMismatchError
from internlm2_jax.model import abstract_params

Params = Any

def check_config(source: ModelConfig, config: ModelConfig, path: str) -> None:
    """Raises `CheckpointMismatchError` naming `path` and the fields when the checkpoint's architecture differs."""
    bad = sorted(f.name for f in dataclasses.fields(source) if f.name not in CONFIG_FIELDS_NOT_CHECKED
                 and getattr(source, f.name) != getattr(config, f.name))
    if bad:
        detail = ", ".join(f"{k}: checkpoint {getattr(source, k)!r} vs model {getattr(config, k)!r}" for k in bad)
        raise CheckpointMismatchError(f"{path}: checkpoint config differs from the model config ({detail})")


def place(params: Params, shardings: Params, dtype: Any = None) -> Params:
    """Unboxes `params` and puts each leaf on its sharding (optionally cast): host arrays through
    `make_array_from_callback` (multi-host safe: each process reads only its shards' slices), device arrays
    through `jax.device_put` into new buffers (never aliasing the input, so a later donation of the result
    cannot invalidate the caller's arrays)."""
    def one(x: Any, s: jax.sharding.Sharding) -> jax.Array:
        if isinstance(x, jax.Array):
            return jax.device_put(x if dtype is None else x.astype(dtype), s, may_alias=False)
        x = np.asarray(x) if dtype is None else np.asarray(x, dtype)
        return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])

    return jax.tree.map(one, nn.meta.unbox(params), shardings)


def orbax_dir(path: str) -> Optional[str]:
    """The Orbax checkpoint directory under `path` (`path/checkpoints` or `path`), or None."""
    for d in (os.path.join(path, "checkpoints"), path):
        if os.path.isdir(d) and any(n.isdigit() and os.path.isdir(os.path.join(d, n, "state")) for n in os.listdir(d)):
            return d
    return None


def source_kind(path: str) -> str:
    """`"hf"`, `"orbax"` or `"msgpack"`; a `FileNotFoundError` naming `path` otherwise."""
    if path.endswith(".msgpack") and os.path.isfile(path):
        return "msgpack"
    if os.path.isfile(os.path.join(path, "config.json")):
        return "hf"
    if os.path.isdir(path) and orbax_dir(path):
        return "orbax"
    raise FileNotFoundError(f"{path}: not an HF folder, an Orbax workdir/checkpoint dir or a .msgpack file")


def _newest_step(directory: str) -> int:
    return max(int(n) for n in os.listdir(directory) if n.isdigit() and os.path.isdir(os.path.join(directory, n)))


def _params_subtree(directory: str, step: int, want_reward: bool) -> Optional[tuple[str, ...]]:
    """Where the wanted params sit in a saved state: `params` (TrainState), `actor_state.params` /
    `critic_state.params` (an `RLState`); None when the checkpoint holds no such model (e.g. a policy when an
    RM is wanted)."""
    tree = state_tree(directory, step)
    for sub in (("params",), ("critic_state", "params") if want_reward else ("actor_state", "params")):
        node: Any = tree
        for k in sub:
            node = node.get(k) if isinstance(node, dict) else None
        if isinstance(node, dict) and ("v_head" in node) == want_reward:
            return sub
    return None


def _abstract(shardings: Params, like: Params) -> Params:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), like, shardings)


def load_hf_checked(path: str, config: ModelConfig) -> Params:
    """Plain host params of an HF folder whose config matches `config` (`check_config`)."""
    from internlm2_jax.hf_io import load_hf

    hf_cfg, params = load_hf(path, param_dtype=config.param_dtype)
    check_config(hf_cfg, config, path)
    return nn.meta.unbox(params)


def load_policy(path: str, config: ModelConfig, shardings: Params, step: Optional[int] = None) -> Params:
    """Policy (causal LM) params on `shardings` from any source (see the module docstring)."""
    kind = source_kind(path)
    if kind == "orbax":
        d = orbax_dir(path)
        s = _newest_step(d) if step is None else step
        sub = _params_subtree(d, s, want_reward=False)
        if sub is None:
            raise ValueError(f"{path}: checkpoint step {s} holds no policy params (a reward model?)")
        like = nn.meta.unbox(abstract_params(config))
        return load_parameters_only(d, _abstract(shardings, like), s, subtree=sub)
    params = load_hf_checked(path, config) if kind == "hf" else load_msgpack(path)
    return place(params, shardings, config.weight_dtype)


def load_reward(path: str, config: ModelConfig, shardings: Params) -> Params:
    """RM / critic params `{"backbone", "v_head"}` on `shardings`.

    An RM source (msgpack with a `v_head`, an Orbax RM workdir, a PPO workdir's critic) is read as is; a policy
    source (HF, SFT / pretraining workdir) becomes the backbone of a fresh RM with a zero head.
    """
    from internlm2_jax.rlhf.reward_model import init_reward_params

    kind = source_kind(path)
    if kind == "msgpack":
        params = load_msgpack(path)
        if "v_head" not in params:
            params = init_reward_params(config, jax.random.key(0), backbone=params)
        return place(params, shardings, config.weight_dtype)
    if kind == "orbax":
        d = orbax_dir(path)
        s = _newest_step(d)
        sub = _params_subtree(d, s, want_reward=True)
        if sub is not None:
            like = nn.meta.unbox(jax.eval_shape(lambda: init_reward_params(config, jax.random.key(0))))
            return load_parameters_only(d, _abstract(shardings, like), s, subtree=sub)
    from internlm2_jax.train.causal_lm import model_param_shardings

    policy = load_policy(path, config, model_param_shardings(config, jax.tree.leaves(shardings)[0].mesh))
    return {"backbone": {k: v for k, v in policy.items() if k != "output"},
            "v_head": place(np.zeros((config.hidden_size, 1), config.weight_dtype), shardings["v_head"])}


def save_params_orbax(directory: str, step: int, params: Params, meta: Optional[dict] = None) -> str:
    """Writes `{"params": params}` as an Orbax checkpoint `directory/checkpoints/<step>` (synchronously), the
    `TrainState` layout, so `load_policy` / `load_reward` read it back onto any mesh. Returns `directory`."""
    ckpt = Checkpointer(os.path.join(directory, "checkpoints"), CheckpointConfig(async_save=False, keep_last=1))
    ckpt.save(step, {"params": nn.meta.unbox(params)}, meta=meta or {}, force=True)
    ckpt.wait()
    ckpt.close()
    return directory


def save_msgpack(path: str, params: Params) -> None:
    """Writes `params` (boxed or plain; fully addressable) to `path` as msgpack, atomically."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(serialization.msgpack_serialize(jax.tree.map(np.asarray, nn.meta.unbox(params))))
    os.replace(tmp, path)


def load_msgpack(path: str) -> Params:
    """Reads a param tree written by `save_msgpack` (numpy leaves)."""
    with open(path, "rb") as f:
        return serialization.msgpack_restore(f.read())


def single_device_abstract(config: ModelConfig) -> Params:
    """Abstract plain params of `config` on the first device (eval / chat without a mesh)."""
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
                        nn.meta.unbox(abstract_params(config)))
