"""Mesh placement of the RLHF models (actor, critic, reference, RM), like the pretraining `Trainer`.

Param shardings come from the logical axis names of boxed params (`nn.get_partition_spec`) mapped through
`internlm2_jax.sharding.LOGICAL_RULES`; the RM / critic `v_head [D, 1]` uses `("embed", None)`. Optimizer
state shardings come from `tx.init` on the boxed tree (moments inherit the param boxes). Batches `[B, ...]`
shard their leading axis over `data × fsdp` (and `[B, T]` the second over `sequence`).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding

from internlm2_jax.config import ModelConfig
from internlm2_jax.model import init_params
from internlm2_jax.rlhf.reward_model import init_reward_params
from internlm2_jax.sharding import LOGICAL_RULES, MeshConfig, logical_to_sharding, make_mesh, validate
from internlm2_jax.train.step import mesh_context

Params = Any

__all__ = ["actor_shardings", "batch_shardings", "critic_shardings", "default_mesh", "mesh_context",
           "opt_shardings", "place"]


def default_mesh(devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """A one-device mesh (the single-device path of every RLHF trainer)."""
    return make_mesh(MeshConfig(data=1), list(devices) if devices is not None else jax.devices()[:1])


def _boxed_actor(config: ModelConfig) -> Params:
    return jax.eval_shape(lambda: init_params(config, jax.random.key(0)))


def _boxed_critic(config: ModelConfig) -> Params:
    return jax.eval_shape(lambda: init_reward_params(config, jax.random.key(0), boxed=True))


def actor_shardings(config: ModelConfig, mesh: Mesh) -> Params:
    """`NamedSharding` tree of the policy params (same structure as unboxed `init_params`)."""
    validate(config, mesh)
    return logical_to_sharding(nn.get_partition_spec(_boxed_actor(config)), mesh)


def critic_shardings(config: ModelConfig, mesh: Mesh) -> Params:
    """`NamedSharding` tree of RM / critic params `{"backbone", "v_head"}`."""
    validate(config, mesh)
    return logical_to_sharding(nn.get_partition_spec(_boxed_critic(config)), mesh)


def opt_shardings(config: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh, *,
                  critic: bool = False) -> Any:
    """Shardings of `tx.init(params)` for the actor (or the critic/RM with `critic=True`)."""
    boxed = _boxed_critic(config) if critic else _boxed_actor(config)
    return logical_to_sharding(nn.get_partition_spec(jax.eval_shape(tx.init, boxed)), mesh)


def place(params: Params, shardings: Params, dtype: Any = None) -> Params:
    """Unboxes `params` (numpy or jax leaves) and puts each leaf on its sharding (optionally cast)."""
    plain = nn.meta.unbox(params)
    return jax.tree.map(lambda x, s: jax.device_put(np.asarray(x) if dtype is None else np.asarray(x, dtype), s),
                        plain, shardings)


def batch_spec(mesh: Mesh, rank: int) -> NamedSharding:
    """`[B]` → batch over data×fsdp; `[B, T, ...]` → also length over sequence."""
    names = ("batch",) if rank == 1 else ("batch", "length") + (None,) * (rank - 2)
    return NamedSharding(mesh, nn.logical_to_mesh_axes(names, LOGICAL_RULES))


def batch_shardings(mesh: Mesh, batch: Any) -> Any:
    """Sharding tree matching `batch` (any pytree of arrays with a leading batch axis)."""
    return jax.tree.map(lambda x: batch_spec(mesh, np.ndim(x)), batch)


def put_batch(mesh: Mesh, batch: Any) -> Any:
    """Places a host batch on the mesh with `batch_shardings`."""
    return jax.tree.map(lambda x: jax.device_put(x, batch_spec(mesh, np.ndim(x))), batch)
