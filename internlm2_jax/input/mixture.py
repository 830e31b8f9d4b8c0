"""Deterministic weighted mixing of per-source document datasets, and per-process sharding.

Mixing is at the *document* level and uses Grain's `MapDataset.mix`, which interleaves the
sources deterministically so that every window of ~100 x (#sources) documents follows the
weights exactly (no sampling noise). Randomness comes from the per-source shuffles, whose seeds
derive from the pipeline seed and the source name, so a seed fully determines the stream.
Token-level proportions therefore also depend on each source's mean document length.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import grain


def source_seed(seed: int, name: str) -> int:
    """Per-source shuffle seed in [0, 2**32): stable across runs and Python versions."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def normalize_weights(weights: Mapping[str, float], names: list[str]) -> dict[str, float]:
    """Check weights name exactly the sources and are positive; return them summing to 1."""
    if set(weights) != set(names):
        raise ValueError(f"mixture weights {sorted(weights)} must name exactly the sources "
                         f"{sorted(names)}")
    bad = {k: w for k, w in weights.items() if not w > 0}
    if bad:
        raise ValueError(f"mixture weights must be > 0 (drop a source instead): {bad}")
    total = float(sum(weights.values()))
    return {k: float(weights[k]) / total for k in names}


def mix_sources(datasets: Mapping[str, grain.MapDataset], weights: Mapping[str, float] | None,
                ) -> grain.MapDataset:
    """Mix document datasets by weight (uniform if `weights` is None).

    The result's length is finite when the sources are: it ends when the first source runs out
    of its share (Grain semantics); with infinitely repeated sources it is infinite.
    """
    names = sorted(datasets)
    if not names:
        raise ValueError("no input sources configured")
    if len(names) == 1:
        return datasets[names[0]]
    w = normalize_weights(weights if weights is not None else {n: 1.0 for n in names}, names)
    return grain.MapDataset.mix([datasets[n] for n in names], [w[n] for n in names])


def concat_sources(datasets: Mapping[str, grain.MapDataset]) -> grain.MapDataset:
    """All documents of every source once, sources in name order (validation: ignores weights)."""
    names = sorted(datasets)
    if len(names) == 1:
        return datasets[names[0]]
    return grain.MapDataset.concatenate([datasets[n] for n in names])


def resolve_shard(shard_index: int | None, shard_count: int | None) -> tuple[int, int]:
    """Explicit (index, count), or this JAX process's (process_index, process_count)."""
    if (shard_index is None) != (shard_count is None):
        raise ValueError("pass both shard_index and shard_count, or neither")
    if shard_index is None:
        import jax

        shard_index, shard_count = jax.process_index(), jax.process_count()
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} not in [0, {shard_count})")
    return int(shard_index), int(shard_count)


def shard(ds: grain.MapDataset, shard_index: int, shard_count: int) -> grain.MapDataset:
    """Documents shard_index, shard_index + count, ... of the (already mixed + shuffled) stream:
    the shards are disjoint and together are exactly the single-process stream."""
    if shard_count == 1:
        return ds
    return ds[shard_index::shard_count]
