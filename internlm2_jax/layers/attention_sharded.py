"""Run the Pallas flash kernel per shard under `jax.shard_map`.

A `pallas_call` is opaque to the SPMD partitioner, so on a mesh we map it explicitly:
q/k/v `P(('data', 'fsdp'), None, 'tensor', None)` (batch over data/fsdp, heads over tensor;
query heads of kv head `j` stay on the shard holding `j` because groups are contiguous) and
segment ids `P(('data', 'fsdp'), None)`. Axes missing from the mesh are dropped from the specs.
Without a mesh (or a mesh of size 1) the kernel is called directly.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import jax
from jax.sharding import AbstractMesh, Mesh, PartitionSpec as P

BATCH_AXES = ("data", "fsdp")
HEADS_AXIS = "tensor"


def _current_mesh() -> Optional[Union[Mesh, AbstractMesh]]:
    """The mesh in context: `jax.set_mesh`/`use_mesh` (abstract) or a legacy `with mesh:`."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is not None and not mesh.empty:
        return mesh
    try:  # legacy `with Mesh(...):` context
        from jax._src.mesh import thread_resources

        physical = thread_resources.env.physical_mesh
        return None if physical.empty else physical
    except (ImportError, AttributeError):
        return None


def sharded_flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    segment_ids: Optional[jax.Array] = None,
    causal: bool = True,
    scale: Optional[float] = None,
    mesh: Optional[Union[Mesh, AbstractMesh]] = None,
    **kernel_kwargs,
) -> jax.Array:
    """`kernels_pallas.flash_attention` on each (batch, heads) shard of `mesh`.

    Args:
      q: `[B, S, H, D]`; k, v: `[B, S, KV, D]`; segment_ids: `[B, S]` or None.
      mesh: explicit mesh; default the mesh in context; None/empty -> plain call.
      kernel_kwargs: forwarded to `flash_attention` (block_sizes, backend, interpret).
    Returns:
      `[B, S, H, D]`, sharded like q.
    """
    from kernels_pallas.flash_attention import flash_attention  # keep pallas off the import path

    def kernel(q_, k_, v_, seg_):
        return flash_attention(q_, k_, v_, segment_ids=seg_, causal=causal, sm_scale=scale,
                               **kernel_kwargs)

    mesh = _current_mesh() if mesh is None else mesh
    if mesh is None or mesh.empty or math.prod(mesh.shape.values()) == 1:
        return kernel(q, k, v, segment_ids)

    batch = tuple(a for a in BATCH_AXES if a in mesh.shape)
    heads = HEADS_AXIS if HEADS_AXIS in mesh.shape else None
    n_batch = math.prod(mesh.shape[a] for a in batch)
    n_heads = mesh.shape[heads] if heads else 1
    if q.shape[0] % n_batch:
        raise ValueError(f"batch {q.shape[0]} not divisible by mesh axes {batch} (size {n_batch})")
    if k.shape[2] % n_heads or q.shape[2] % n_heads:
        raise ValueError(
            f"heads {q.shape[2]} / kv heads {k.shape[2]} not divisible by mesh axis "
            f"{heads!r} (size {n_heads})"
        )
    batch_spec = batch if batch else None
    qkv_spec = P(batch_spec, None, heads, None)
    seg_spec = P(batch_spec, None)
    if segment_ids is None:
        fn = lambda q_, k_, v_: kernel(q_, k_, v_, None)
        in_specs, args = (qkv_spec, qkv_spec, qkv_spec), (q, k, v)
    else:
        fn = kernel
        in_specs, args = (qkv_spec, qkv_spec, qkv_spec, seg_spec), (q, k, v, segment_ids)
    mapped = jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=qkv_spec, check_vma=False)
    return mapped(*args)
