"""Parameter creation with logical axis names."""

from __future__ import annotations

from typing import Callable, Sequence

import flax.linen as nn
import jax

Initializer = Callable[..., jax.Array]


def logical_param(
    module: nn.Module,
    name: str,
    init: Initializer,
    shape: Sequence[int],
    axes: Sequence[str],
    dtype,
) -> jax.Array:
    """Creates `module.<name>` of `shape` whose leaf carries the logical `axes` (one per dim)."""
    if len(shape) != len(axes):
        raise ValueError(f"param {name}: shape {tuple(shape)} and axes {tuple(axes)} differ in rank")
    return module.param(name, nn.with_logical_partitioning(init, tuple(axes)), tuple(shape), dtype)


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """Sharding constraint by logical names; a no-op outside a mesh / rules context."""
    return nn.with_logical_constraint(x, tuple(axes))
