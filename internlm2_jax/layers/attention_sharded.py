"""Run an attention kernel per shard under `jax.shard_map`, with context parallelism over `sequence`.

A `pallas_call` is opaque to the SPMD partitioner, so on a mesh we map it explicitly:
q/k/v `P(('data', 'fsdp'), 'sequence', 'tensor', None)` (batch over data/fsdp, the sequence over
`sequence`, heads over tensor; query heads of kv head `j` stay on the shard holding `j` because groups
are contiguous) and segment ids `P(('data', 'fsdp'), 'sequence')`. Axes missing from the mesh are dropped
from the specs. Without a mesh (or a mesh of size 1) the kernel is called directly.

Context parallelism (`sequence` > 1) is the all-to-all scheme of DeepSpeed-Ulysses: before the kernel,
one all-to-all trades the sequence split for a head split (each device then holds the whole sequence for
`heads / (tensor * sequence)` of the heads), the kernel runs unchanged (causal, packed segment ids, GQA),
and one all-to-all trades back. Every device does the same causal work (no load imbalance, no reordering)
and holds `1 / sequence` of the attention activations. The limit: the kv heads of a tensor shard are
split `sequence` ways; when they do not divide, each is repeated (its query heads follow it), so
`sequence` can grow up to the query heads per tensor shard. Picture in docs/sharding.md.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Optional, Union

import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh, Mesh, PartitionSpec as P

BATCH_AXES = ("data", "fsdp")
HEADS_AXIS = "tensor"
SEQUENCE_AXIS = "sequence"


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


def sharded_attention(
    kernel: Callable[[jax.Array, jax.Array, jax.Array, Optional[jax.Array]], jax.Array],
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    segment_ids: Optional[jax.Array] = None,
    mesh: Optional[Union[Mesh, AbstractMesh]] = None,
) -> jax.Array:
    """`kernel(q, k, v, segment_ids)` on each (batch, heads) shard of `mesh`, the whole sequence at once.

    Args:
      kernel: attention over full sequences, `[b, S, h, D]` x `[b, S, kv, D]` → `[b, S, h, D]`.
      q: `[B, S, H, D]`; k, v: `[B, S, KV, D]`; segment_ids: `[B, S]` or None.
      mesh: explicit mesh; default the mesh in context; None/empty -> plain call.
    Returns:
      `[B, S, H, D]`, sharded like q.
    """
    mesh = _current_mesh() if mesh is None else mesh
    if mesh is None or mesh.empty or math.prod(mesh.shape.values()) == 1:
        return kernel(q, k, v, segment_ids)

    batch = tuple(a for a in BATCH_AXES if a in mesh.shape)
    heads = HEADS_AXIS if HEADS_AXIS in mesh.shape else None
    seq = SEQUENCE_AXIS if mesh.shape.get(SEQUENCE_AXIS, 1) > 1 else None
    n_heads = mesh.shape[heads] if heads else 1
    if k.shape[2] % n_heads or q.shape[2] % n_heads:
        raise ValueError(
            f"heads {q.shape[2]} / kv heads {k.shape[2]} not divisible by mesh axis "
            f"{heads!r} (size {n_heads})"
        )
    # Shapes that do not split (e.g. the one-token batch `init_params` traces) run unsplit on that axis.
    if q.shape[0] % math.prod(mesh.shape[a] for a in batch):
        batch = ()
    if seq and q.shape[1] % mesh.shape[seq]:
        seq = None
    n_seq = mesh.shape[seq] if seq else 1
    h_loc, kv_loc = q.shape[2] // n_heads, k.shape[2] // n_heads
    rep = 1
    if seq:
        rep = n_seq // math.gcd(kv_loc, n_seq)  # kv heads repeated so that they split n_seq ways
        if h_loc % n_seq or (h_loc // kv_loc) % rep:
            raise ValueError(
                f"context parallelism splits each tensor shard's {h_loc} query heads ({kv_loc} kv heads) "
                f"{n_seq} ways over 'sequence': the query heads per shard must be a multiple of {n_seq}")

    def local(q_, k_, v_, seg_):
        if seq is None:
            return kernel(q_, k_, v_, seg_)
        if rep > 1:  # kv head j -> j * rep + r; query head h keeps its kv head (groups of G / rep)
            k_, v_ = jnp.repeat(k_, rep, axis=2), jnp.repeat(v_, rep, axis=2)
        to_heads = functools.partial(jax.lax.all_to_all, axis_name=seq, split_axis=2, concat_axis=1, tiled=True)
        if seg_ is not None:
            seg_ = jax.lax.all_gather(seg_, seq, axis=1, tiled=True)
        out = kernel(to_heads(q_), to_heads(k_), to_heads(v_), seg_)
        return jax.lax.all_to_all(out, seq, split_axis=1, concat_axis=2, tiled=True)

    batch_spec = batch if batch else None
    qkv_spec = P(batch_spec, seq, heads, None)
    seg_spec = P(batch_spec, seq)
    if segment_ids is None:
        fn = lambda q_, k_, v_: local(q_, k_, v_, None)  # noqa: E731
        in_specs, args = (qkv_spec, qkv_spec, qkv_spec), (q, k, v)
    else:
        fn = local
        in_specs, args = (qkv_spec, qkv_spec, qkv_spec, seg_spec), (q, k, v, segment_ids)
    mapped = jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=qkv_spec, check_vma=False)
    return mapped(*args)


def uses_context_parallelism(mesh: Optional[Union[Mesh, AbstractMesh]] = None) -> bool:
    """Whether the mesh (default: the one in context) splits the sequence."""
    mesh = _current_mesh() if mesh is None else mesh
    return mesh is not None and not mesh.empty and mesh.shape.get(SEQUENCE_AXIS, 1) > 1


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
    """`kernels_pallas.flash_attention` per shard (`sharded_attention`); `kernel_kwargs` (block_sizes, backend,
    interpret) go to the kernel."""
    from kernels_pallas.flash_attention import flash_attention  # keep pallas off the import path

    def kernel(q_, k_, v_, seg_):
        return flash_attention(q_, k_, v_, segment_ids=seg_, causal=causal, sm_scale=scale, **kernel_kwargs)

    return sharded_attention(kernel, q, k, v, segment_ids, mesh)
