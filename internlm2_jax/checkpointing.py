"""Orbax checkpoints: train state + data-iterator state + run metadata, with corrupt-fallback."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Where and how often checkpoints are kept."""

    keep_last: int = 3
    """Keep the newest N checkpoints ..."""
    keep_every: Optional[int] = None
    """... plus every checkpoint whose step is a multiple of this (None: none extra)."""
    async_save: bool = True
    """Write in a background thread while training continues."""


def _iterators(data_iter: Any) -> dict[str, Any]:
    """Item names of the data iterators: one iterator → `data`; a dict → `data` for key "" and
    `data_<key>` for the others (e.g. PPO's prompt and pretraining iterators)."""
    if not isinstance(data_iter, dict):
        return {"data": data_iter}
    return {("data" if k == "" else f"data_{k}"): it for k, it in data_iter.items()}


class Checkpointer:
    """`CheckpointManager` over items `state` (sharded arrays), `data` (grain iterator), `meta` (JSON)."""

    def __init__(self, directory: str, cfg: CheckpointConfig = CheckpointConfig()):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=cfg.keep_last, keep_period=cfg.keep_every,
            enable_async_checkpointing=cfg.async_save, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, data_iter: Any = None, meta: Optional[dict] = None,
             force: bool = False) -> None:
        """Saves (asynchronously unless disabled); `data_iter` is a grain iterator or a dict of them (restored in
        place by `restore`); `meta` is any JSON-able dict (config, RNG seed...)."""
        args = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta or {})}
        if data_iter is not None:
            import grain
            for name, it in _iterators(data_iter).items():
                args[name] = grain.checkpoint.CheckpointSave(it)
        self.manager.save(step, args=ocp.args.Composite(**args), force=force)

    def wait(self) -> None:
        """Blocks until pending async saves are committed."""
        self.manager.wait_until_finished()

    def restore(self, abstract_state: Any, data_iter: Any = None,
                step: Optional[int] = None) -> Optional[tuple[int, Any, dict]]:
        """Restores the newest readable checkpoint (or `step`) onto `abstract_state`'s shardings.

        A checkpoint that fails to read (partial or corrupt) is skipped with a warning and the one
        before it is used. Returns `(step, state, meta)` or None when there is none.
        """
        steps = [step] if step is not None else list(reversed(self.all_steps()))
        for s in steps:
            args = {"state": ocp.args.StandardRestore(abstract_state), "meta": ocp.args.JsonRestore()}
            if data_iter is not None:
                import grain
                for name, it in _iterators(data_iter).items():
                    args[name] = grain.checkpoint.CheckpointRestore(it)
            try:
                out = self.manager.restore(s, args=ocp.args.Composite(**args))
            except Exception as e:  # noqa: BLE001 - any read failure means "unusable checkpoint"
                if step is not None:
                    raise
                aside = self._set_aside(s)
                log.warning("checkpoint step %d in %s is unreadable (%s: %s); moved to %s, falling back to the "
                            "previous one", s, self.directory, type(e).__name__, str(e).splitlines()[0][:200], aside)
                continue
            return s, out["state"], dict(out["meta"] or {})
        if steps and step is None:
            log.warning("no readable checkpoint in %s; starting from scratch", self.directory)
        return None

    def _set_aside(self, step: int) -> str:
        """Renames an unreadable step dir (kept for inspection) so a later save can reuse the step."""
        src = os.path.join(self.directory, str(step))
        dst = f"{src}.unreadable-{int(time.time())}"
        if jax.process_index() == 0 and os.path.exists(src):
            os.replace(src, dst)
        self.manager.reload()
        return dst

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def state_tree(directory: str, step: int) -> dict:
    """The nested-dict structure (array metadata leaves) of checkpoint `step`'s state, without reading arrays."""
    path = os.path.join(os.path.abspath(directory), str(step), "state")
    meta = ocp.PyTreeCheckpointer().metadata(path)
    return dict(getattr(meta, "item_metadata", meta).tree)


def load_parameters_only(directory: str, abstract_params: Any, step: Optional[int] = None,
                         subtree: tuple[str, ...] = ("params",)) -> Any:
    """Params from a train-state checkpoint (warm start): no optimizer state or data state read.

    `subtree`: where the params sit in the saved state (`("params",)` for a `TrainState`,
    `("actor_state", "params")` for an `RLState`). Restored onto `abstract_params`' shardings.
    """
    ckpt = Checkpointer(directory, CheckpointConfig(async_save=False))
    steps = ckpt.all_steps()
    if not steps:
        raise FileNotFoundError(f"no checkpoint found in {directory}")
    s = steps[-1] if step is None else step
    path = os.path.join(ckpt.directory, str(s), "state")

    def nest(x: Any) -> Any:
        for k in reversed(subtree):
            x = {k: x}
        return x

    restored = ocp.PyTreeCheckpointer().restore(
        path, args=ocp.args.PyTreeRestore(
            item=nest(abstract_params),
            restore_args=nest(jax.tree.map(
                lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, global_shape=a.shape, dtype=a.dtype),
                abstract_params)),
            partial_restore=True))
    ckpt.close()
    for k in subtree:
        restored = restored[k]
    return restored
