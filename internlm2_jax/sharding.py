"""Device mesh, the one logical→mesh rules table, and shardings derived from logical axis names."""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from internlm2_jax.config import ModelConfig
from internlm2_jax.errors import ConfigValueError

MESH_AXES = ("data", "fsdp", "tensor", "sequence")

# Logical axis → mesh axes. Flax applies rules in order and never reuses a mesh axis within one
# array, so activation `embed` (after `batch` took data+fsdp) stays unsharded while param `embed`
# shards over fsdp. The fused wqkv shards over `tensor` through `kv_heads`: whole GQA groups.
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", "sequence"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("embed", "fsdp"),
    ("qkv_group", None),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Sizes of the mesh axes; exactly one may be -1 (= fill with the remaining devices)."""

    data: int = -1
    """Pure data parallelism (params replicated)."""
    fsdp: int = 1
    """Data parallelism with params/grads/optimizer state sharded (ZeRO-3 style)."""
    tensor: int = 1
    """Megatron tensor parallelism over heads / kv groups / mlp / vocab."""
    sequence: int = 1
    """Sequence (context) parallelism over the `length` axis of activations."""

    def sizes(self, num_devices: int) -> dict[str, int]:
        """Resolved axis sizes for `num_devices` devices; raises a clear error if impossible."""
        sizes = {a: getattr(self, a) for a in MESH_AXES}
        bad = {a: s for a, s in sizes.items() if s == 0 or s < -1}
        if bad:
            raise ValueError(f"mesh axis sizes must be positive or -1, got {bad}")
        fill = [a for a, s in sizes.items() if s == -1]
        if len(fill) > 1:
            raise ValueError(f"only one mesh axis may be -1, got {fill}")
        fixed = math.prod(s for s in sizes.values() if s != -1)
        if fill:
            if num_devices % fixed:
                raise ValueError(f"mesh {sizes}: {num_devices} devices are not divisible by the fixed axes' "
                                 f"product {fixed}")
            sizes[fill[0]] = num_devices // fixed
        elif fixed != num_devices:
            raise ValueError(f"mesh {sizes} has {fixed} devices but {num_devices} are available")
        return sizes


def make_mesh(mesh_config: MeshConfig, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """A `Mesh` over axes (data, fsdp, tensor, sequence) from `mesh_config`."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_config.sizes(len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def validate(config: ModelConfig, mesh: Mesh, *, global_batch: Optional[int] = None,
             seq_len: Optional[int] = None) -> None:
    """Raises one clear error if a model/batch dimension does not divide the mesh axis it maps to; warns (naming
    the RoPE scaling in force) when `seq_len` exceeds `max_position_embeddings`."""
    t, f, s = mesh.shape["tensor"], mesh.shape["fsdp"], mesh.shape["sequence"]
    checks = [
        ("num_key_value_heads", config.num_key_value_heads, "tensor", t),
        ("num_attention_heads", config.num_attention_heads, "tensor", t),
        ("intermediate_size", config.intermediate_size, "tensor", t),
        ("vocab_size", config.vocab_size, "tensor", t),
        ("hidden_size", config.hidden_size, "fsdp", f),
    ]
    if global_batch is not None:
        checks.append(("global batch size", global_batch, "data*fsdp", mesh.shape["data"] * f))
    if seq_len is not None:
        checks.append(("sequence length", seq_len, "sequence", s))
    for name, value, axis, size in checks:
        if value % size:
            raise ConfigValueError(f"{name}={value} is not divisible by mesh axis {axis}={size}")
    if seq_len is not None and seq_len > config.max_position_embeddings:
        scaling = dict(config.rope_scaling) if config.rope_scaling else "none"
        logging.getLogger(__name__).warning(
            "seq_len=%d exceeds the model's max_position_embeddings=%d: positions past it run RoPE (base %g, "
            "scaling %s) beyond the model's trained range", seq_len, config.max_position_embeddings,
            config.rope_theta, scaling)


def logical_to_sharding(logical_specs: Any, mesh: Mesh, rules=LOGICAL_RULES) -> Any:
    """Maps a tree of logical `PartitionSpec`s to `NamedSharding`s on `mesh`."""
    return nn.logical_to_mesh_sharding(logical_specs, mesh, rules)


def data_sharding(mesh: Mesh, rank: int = 2) -> NamedSharding:
    """Sharding of a `[batch, length, ...]` input array (`[batch]` for rank 1, replicated for a scalar)."""
    names = ("batch", "length")[:rank] + (None,) * max(rank - 2, 0)
    return NamedSharding(mesh, nn.logical_to_mesh_axes(names, LOGICAL_RULES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def shard_shapes(tree: Any) -> Any:
    """Per-device shard shape of every array leaf (for tests and debugging)."""
    return jax.tree.map(lambda x: x.addressable_shards[0].data.shape, tree)


def host_local_to_global(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles each process's share of the global batch into global arrays (multi-host safe)."""
    return {k: jax.make_array_from_process_local_data(data_sharding(mesh, np.ndim(v)), np.asarray(v))
            for k, v in local.items()}
