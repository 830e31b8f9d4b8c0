"""What a checkpoint restore verifies: per-array checksums, sane values, and the state's structure.

A checkpoint's `meta` holds one fingerprint per array, computed on device at save time:
`[sum of the array's bit patterns mod 2**32, position-weighted sum mod 2**32]` (any single flipped bit changes the
first; swapped or shifted blocks change the second). A restore recomputes them on the restored arrays, so a
flipped bit on disk is found even where the file format itself reads fine. Values are then checked: a restored
float array must be finite with magnitude below `ABSURD_MAGNITUDE` (weights of 5.7e36 are garbage, not a model).
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

ABSURD_MAGNITUDE = 1e15
"""No weight or optimizer moment of a healthy run comes near this; larger magnitudes mean corrupt bytes."""

FINGERPRINT_VERSION = 1


def _bits_u32(x: jax.Array) -> jax.Array:
    """The array's bit patterns as uint32 words `[n]` (16-bit types widened, 64-bit types split)."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    width = x.dtype.itemsize
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[width]
    return jax.lax.bitcast_convert_type(x, unsigned).reshape(-1).astype(jnp.uint32)


def _fingerprint(x: jax.Array) -> jax.Array:
    """`[checksum, weighted checksum, max |x| as float32 bits]` (uint32 `[3]`); max is 0 for non-floats."""
    words = _bits_u32(x)
    weights = jnp.arange(words.shape[0], dtype=jnp.uint32) * jnp.uint32(2) + jnp.uint32(1)
    if jnp.issubdtype(x.dtype, jnp.floating):
        biggest = jnp.max(jnp.abs(x.astype(jnp.float32))) if x.size else jnp.float32(0)  # NaN propagates
    else:
        biggest = jnp.float32(0)
    return jnp.stack([jnp.sum(words, dtype=jnp.uint32), jnp.sum(words * weights, dtype=jnp.uint32),
                      jax.lax.bitcast_convert_type(biggest, jnp.uint32)])


@jax.jit
def _fingerprints(leaves: list[jax.Array]) -> list[jax.Array]:
    return [_fingerprint(x) for x in leaves]


def _first_local(x: jax.Array) -> np.ndarray:
    """A replicated result's value on this process (works when other processes hold the other copies)."""
    return np.asarray(x.addressable_shards[0].data) if isinstance(x, jax.Array) else np.asarray(x)


def fingerprints(tree: Any, prefix: str = "") -> dict[str, list]:
    """`{prefix + "a/b/c": [checksum, weighted checksum, max |x|]}` of every array leaf (computed on device)."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    paths = [prefix + _path(p) for p, x in flat if hasattr(x, "dtype")]
    leaves = [jnp.asarray(x) if not isinstance(x, jax.Array) else x for _, x in flat if hasattr(x, "dtype")]
    out = {}
    for path, fp in zip(paths, _fingerprints(leaves)):
        words = _first_local(fp).astype(np.uint32)
        out[path] = [int(words[0]), int(words[1]), float(words[2:3].view(np.float32)[0])]
    return out


def integrity_meta(tree: Any) -> dict:
    """What `Checkpointer.save` stores in a checkpoint's meta under `"integrity"`."""
    return {"version": FINGERPRINT_VERSION, "arrays": fingerprints(tree)}


def verify(tree: Any, saved: Optional[dict], prefix: str = "") -> Optional[str]:
    """Why the restored `tree` is unusable (checksum differs from `saved`, or a value is non-finite or absurd),
    or None. `prefix`: where `tree` sits in the saved state (`"params/"` for params read alone). Checkpoints
    written before checksums existed (`saved` None) get the value check only."""
    now = fingerprints(tree, prefix)
    arrays = (saved or {}).get("arrays", {}) if (saved or {}).get("version") == FINGERPRINT_VERSION else {}
    for path, (total, weighted, biggest) in now.items():
        want = arrays.get(path)
        if want is not None and (want[0], want[1]) != (total, weighted):
            return f"checksum mismatch in {path} (the bytes on disk changed after the save)"
        if not np.isfinite(biggest):
            return f"non-finite values in {path}"
        if biggest > ABSURD_MAGNITUDE:
            return f"absurd values in {path} (max |x| = {biggest:.3g} > {ABSURD_MAGNITUDE:.0e})"
    return None


def structure_diff(saved_tree: dict, abstract_state: Any, limit: int = 4) -> list[str]:
    """Differences between a checkpoint's array metadata tree and the state a run expects: missing or extra
    arrays and shape changes, as readable lines (at most `limit`, then a count)."""
    def flat(tree: Any) -> dict[str, tuple]:
        leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
        return {_path(p): tuple(getattr(x, "shape", ())) for p, x in leaves if hasattr(x, "shape")}

    have, want = flat(saved_tree), flat(abstract_state)
    order = lambda k: ("opt_state" in k, k)  # noqa: E731 - params first: they explain the optimizer's diffs
    lines = [f"{k}: checkpoint shape {have[k]} vs this run's {want[k]}"
             for k in sorted(have.keys() & want.keys(), key=order) if have[k] != want[k]]
    lines += [f"{k}: only in the checkpoint" for k in sorted(have.keys() - want.keys(), key=order)]
    lines += [f"{k}: missing from the checkpoint" for k in sorted(want.keys() - have.keys(), key=order)]
    return lines[:limit] + ([f"... {len(lines) - limit} more"] if len(lines) > limit else [])


def _path(path: tuple) -> str:
    """A tree path as `a/b/c` whatever the containers (dict keys, dataclass attributes, indices)."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
    return "/".join(parts)
