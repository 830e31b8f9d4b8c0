"""Loading / saving RLHF models: HF folders, our Orbax workdirs (pretraining, SFT, RM, PPO), msgpack.

Sources accepted by `load_policy` / `load_reward` (`path`):
  * an HF InternLM2 folder (has `config.json`) — `internlm2_jax.load_hf`;
  * an Orbax workdir or checkpoint directory (`<dir>/checkpoints/<step>/state` or `<dir>/<step>/state`) written
    by the pretraining / SFT runner or by `save_orbax` below — params only, restored onto the shardings;
  * a `.msgpack` file (`internlm2_jax.rlhf.params_io`), e.g. a small RM head or a legacy actor.
For `load_reward`, a policy source (HF / SFT / pretraining) gives the backbone of a fresh RM (zero `v_head`).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional

import flax.linen as nn
import jax

from internlm2_jax.checkpointing import CheckpointConfig, Checkpointer, load_parameters_only
from internlm2_jax.config import ModelConfig
from internlm2_jax.model import abstract_params
from internlm2_jax.rlhf.mesh import actor_shardings, place
from internlm2_jax.rlhf.params_io import load_params
from internlm2_jax.rlhf.reward_model import init_reward_params

Params = Any
_IGNORED_FIELDS = ("dtype", "param_dtype", "scan_layers", "remat_policy", "attention_impl", "rope_theta",
                   "rope_scaling", "max_position_embeddings")


def _orbax_dir(path: str) -> Optional[str]:
    """The Orbax checkpoint directory under `path` (`path/checkpoints` or `path`), or None."""
    for d in (os.path.join(path, "checkpoints"), path):
        if os.path.isdir(d) and any(n.isdigit() and os.path.isdir(os.path.join(d, n, "state")) for n in os.listdir(d)):
            return d
    return None


def _abstract(shardings: Params, like: Params) -> Params:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), like, shardings)


def _check_hf(path: str, config: ModelConfig) -> Params:
    from internlm2_jax.hf_io import load_hf

    hf_cfg, params = load_hf(path, param_dtype=config.param_dtype)
    bad = sorted(f.name for f in dataclasses.fields(hf_cfg) if f.name not in _IGNORED_FIELDS
                 and getattr(hf_cfg, f.name) != getattr(config, f.name))
    if bad:
        raise ValueError(f"{path}: HF config differs from the model config in {bad}")
    return nn.meta.unbox(params)


def kind_of(path: str) -> str:
    """`"hf"`, `"orbax"` or `"msgpack"` for a checkpoint path; raises FileNotFoundError otherwise."""
    if path.endswith(".msgpack") and os.path.isfile(path):
        return "msgpack"
    if os.path.isfile(os.path.join(path, "config.json")):
        return "hf"
    if os.path.isdir(path) and _orbax_dir(path):
        return "orbax"
    raise FileNotFoundError(f"{path}: not an HF folder, an Orbax workdir/checkpoint dir or a .msgpack file")


def load_policy(path: str, config: ModelConfig, shardings: Params) -> Params:
    """Plain policy params on `shardings` (from `internlm2_jax.rlhf.mesh.actor_shardings`)."""
    kind = kind_of(path)
    if kind == "orbax":
        like = nn.meta.unbox(abstract_params(config))
        return load_parameters_only(_orbax_dir(path), _abstract(shardings, like))
    params = _check_hf(path, config) if kind == "hf" else load_params(path)
    return place(params, shardings, config.weight_dtype)


def load_reward(path: str, config: ModelConfig, shardings: Params) -> Params:
    """RM / critic params `{"backbone", "v_head"}` on `shardings` (`critic_shardings`).

    An RM source (msgpack with a `v_head`, or an Orbax dir saved from RM params) is read as is; a policy
    source (HF, SFT / pretraining workdir) becomes the backbone of a fresh RM with a zero head.
    """
    kind = kind_of(path)
    if kind == "msgpack":
        params = load_params(path)
        if "v_head" not in params:
            params = init_reward_params(config, jax.random.key(0), backbone=params)
        return place(params, shardings, config.weight_dtype)
    if kind == "orbax" and _is_rm_checkpoint(path):
        like = nn.meta.unbox(jax.eval_shape(lambda: init_reward_params(config, jax.random.key(0))))
        return load_parameters_only(_orbax_dir(path), _abstract(shardings, like))
    mesh = jax.tree.leaves(shardings)[0].mesh
    policy = load_policy(path, config, actor_shardings(config, mesh))
    return place(init_reward_params(config, jax.random.key(0), backbone=policy), shardings, config.weight_dtype)


def _is_rm_checkpoint(path: str) -> bool:
    """True if the newest checkpoint's state tree has a `v_head` (an RM / critic, not a policy)."""
    d = _orbax_dir(path)
    step = max(int(n) for n in os.listdir(d) if n.isdigit())
    meta = os.path.join(d, str(step), "state", "_METADATA")
    with open(meta) as f:
        return "v_head" in f.read()


def save_orbax(directory: str, step: int, params: Params, meta: Optional[dict] = None) -> str:
    """Writes `{"params": params}` as an Orbax checkpoint `directory/checkpoints/<step>` (synchronously).

    The layout matches the pretraining runner's, so `load_policy` / `load_reward` (and
    `internlm2_jax.checkpointing.load_parameters_only`) read it back onto any mesh. Returns `directory`.
    """
    ckpt = Checkpointer(os.path.join(directory, "checkpoints"), CheckpointConfig(async_save=False, keep_last=1))
    ckpt.save(step, {"params": nn.meta.unbox(params)}, meta=meta or {}, force=True)
    ckpt.wait()
    ckpt.close()
    return directory
