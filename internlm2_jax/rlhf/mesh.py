"""Meshes and param shardings of the RLHF models (actor, critic, reference, RM).

Param shardings come from the logical axis names of boxed params mapped through
`internlm2_jax.sharding.LOGICAL_RULES` (the RM / critic `v_head [D, 1]` uses `("embed", None)`), exactly as
the `Trainer` derives them for its tasks.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
from jax.sharding import Mesh

from internlm2_jax.config import ModelConfig
from internlm2_jax.rlhf.reward_model import init_reward_params
from internlm2_jax.sharding import MeshConfig, logical_to_sharding, make_mesh, validate
from internlm2_jax.train.causal_lm import model_param_shardings
from internlm2_jax.train.trainer import mesh_context

Params = Any

__all__ = ["actor_shardings", "critic_shardings", "default_mesh", "mesh_context"]


def default_mesh(devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """A one-device mesh (the single-device path of every RLHF stage)."""
    return make_mesh(MeshConfig(data=1), list(devices) if devices is not None else jax.devices()[:1])


def actor_shardings(config: ModelConfig, mesh: Mesh) -> Params:
    """`NamedSharding` tree of the policy params (same structure as unboxed `init_params`)."""
    return model_param_shardings(config, mesh)


def critic_shardings(config: ModelConfig, mesh: Mesh) -> Params:
    """`NamedSharding` tree of RM / critic params `{"backbone", "v_head"}`."""
    validate(config, mesh)
    boxed = jax.eval_shape(lambda: init_reward_params(config, jax.random.key(0), boxed=True))
    return logical_to_sharding(nn.get_partition_spec(boxed), mesh)
