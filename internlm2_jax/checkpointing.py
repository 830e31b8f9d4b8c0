"""Orbax checkpoints: train state + data-iterator state + run metadata (with checksums), verified restore."""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import shutil
import time
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

from internlm2_jax.checkpoint_integrity import integrity_meta, structure_diff, verify
from internlm2_jax.config import CONFIG_FIELDS_NOT_CHECKED
from internlm2_jax.errors import CheckpointCorruptError, CheckpointMismatchError

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
    """`CheckpointManager` over items `state` (sharded arrays), `data` (grain iterator), `meta` (JSON).

    Every save stores per-array checksums in `meta`; `restore` verifies them and the values, falls back to the
    newest usable checkpoint with one warning line, and never renames or deletes anything while reading.
    """

    def __init__(self, directory: str, cfg: CheckpointConfig = CheckpointConfig()):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=cfg.keep_last, keep_period=cfg.keep_every,
            enable_async_checkpointing=cfg.async_save, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self.unusable: dict[int, str] = {}
        """Steps `restore` skipped, and why; set aside only when this run saves the same step again."""

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, data_iter: Any = None, meta: Optional[dict] = None,
             force: bool = False) -> None:
        """Saves (asynchronously unless disabled); `data_iter` is a grain iterator or a dict of them (restored in
        place by `restore`); `meta` is any JSON-able dict (config, RNG seed...), stored with the state's checksums.
        """
        self._check_free_space(step, state)
        meta = {**(meta or {}), "integrity": integrity_meta(state)}
        args = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
        if data_iter is not None:
            import grain
            for name, it in _iterators(data_iter).items():
                args[name] = grain.checkpoint.CheckpointSave(it)
        if step in self.unusable:
            self._set_aside(step)
        self.manager.save(step, args=ocp.args.Composite(**args), force=force)
        log.info("saving checkpoint step %d to %s", step, self.directory)

    def _check_free_space(self, step: int, state: Any) -> None:
        """Raises `OSError(ENOSPC)` before writing when the disk cannot hold this checkpoint: a write that fails
        half-way makes orbax's background threads print a page of tracebacks (the previous checkpoint is intact
        either way)."""
        if not os.path.isdir(self.directory):  # a remote path (gs://...): the store reports its own limits
            return
        need = sum(int(getattr(x, "nbytes", 0)) for x in jax.tree.leaves(state))
        free = shutil.disk_usage(self.directory).free
        if free < need * 1.05 + (1 << 20):
            raise OSError(errno.ENOSPC, f"No space left on device: checkpoint step {step} needs about "
                          f"{need / 2**20:.1f} MiB, {free / 2**20:.1f} MiB free", self.directory)

    def wait(self) -> None:
        """Blocks until pending async saves are committed."""
        self.manager.wait_until_finished()

    def read_meta(self, step: int) -> dict:
        """The JSON `meta` of checkpoint `step` (read without touching the arrays)."""
        with open(os.path.join(self.directory, str(step), "meta", "metadata")) as f:
            return dict(json.load(f) or {})

    def restore(self, abstract_state: Any, data_iter: Any = None, step: Optional[int] = None,
                expect_model: Optional[dict] = None) -> Optional[tuple[int, Any, dict]]:
        """Restores the newest usable checkpoint (or `step`) onto `abstract_state`'s shardings.

        A checkpoint that fails to read, or whose arrays fail their checksums or hold non-finite/absurd values,
        is skipped with one warning line and the one before it is tried (nothing is renamed). A checkpoint of
        another state structure (shapes) or model (`expect_model`, the `meta["model"]` a run writes) raises
        `CheckpointMismatchError`. With no usable checkpoint the data iterators are reset to where they were
        (the start) and None is returned. Returns `(step, state, meta)`.
        """
        steps = [step] if step is not None else list(reversed(self.all_steps()))
        iters = _iterators(data_iter) if data_iter is not None else {}
        start_positions = {k: it.get_state() for k, it in iters.items() if hasattr(it, "get_state")}
        for s in steps:
            try:
                saved_meta, saved_tree = self.read_meta(s), state_tree(self.directory, s)
            except Exception as e:  # noqa: BLE001 - unreadable metadata means an unusable checkpoint
                self._unusable(s, f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}", step)
                continue
            self._check_matches(s, saved_tree, saved_meta, abstract_state, expect_model)
            args = {"state": ocp.args.StandardRestore(abstract_state), "meta": ocp.args.JsonRestore()}
            if iters:
                import grain
                for name, it in iters.items():
                    args[name] = grain.checkpoint.CheckpointRestore(it)
            try:
                out = self.manager.restore(s, args=ocp.args.Composite(**args))
            except Exception as e:  # noqa: BLE001 - any read failure means "unusable checkpoint"
                self._unusable(s, f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}", step)
                continue
            why = verify(out["state"], saved_meta.get("integrity"))
            if why:
                self._unusable(s, why, step)
                continue
            meta = dict(out["meta"] or {})
            meta.pop("integrity", None)  # ours, not the caller's
            return s, out["state"], meta
        for name, position in start_positions.items():
            iters[name].set_state(position)
        if steps and step is None:
            log.warning("no usable checkpoint in %s (unusable steps: %s); starting from scratch at the first "
                        "batch; the unusable ones stay on disk", self.directory, sorted(self.unusable))
        return None

    def _unusable(self, s: int, why: str, requested: Optional[int]) -> None:
        if requested is not None:
            raise CheckpointCorruptError(f"{self.directory}/{s}: unusable checkpoint ({why})")
        self.unusable[s] = why
        log.warning("checkpoint step %d in %s is unusable (%s); falling back to the previous one",
                    s, self.directory, why)

    def _check_matches(self, s: int, saved_tree: dict, saved_meta: dict, abstract_state: Any,
                       expect_model: Optional[dict]) -> None:
        """Raises `CheckpointMismatchError` (touching nothing) when checkpoint `s` belongs to another config."""
        saved_model = saved_meta.get("model")
        lines = [f"model.{k}: checkpoint {saved_model.get(k)} vs this run's {v}" for k, v in expect_model.items()
                 if k not in CONFIG_FIELDS_NOT_CHECKED and k in saved_model and saved_model[k] != v
                 ] if expect_model and isinstance(saved_model, dict) else []
        lines += structure_diff(saved_tree, abstract_state, limit=1 if lines else 4)
        if lines:
            raise CheckpointMismatchError(
                f"{self.directory}/{s} was written by a run with another config ({'; '.join(lines)}). Nothing on "
                "disk was changed: use a new --workdir for the new config, or restore the original config to "
                "resume")

    def _set_aside(self, step: int) -> str:
        """Renames the unusable step dir that this run is about to save again (kept for inspection, never
        deleted)."""
        src = os.path.join(self.directory, str(step))
        dst = f"{src}.unusable-{int(time.time())}"
        if jax.process_index() == 0 and os.path.exists(src):
            os.replace(src, dst)
            log.warning("unusable checkpoint step %d (%s) moved to %s to save this run's step %d",
                        step, self.unusable[step], dst, step)
        self.manager.reload()
        del self.unusable[step]
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
    try:
        integrity = ckpt.read_meta(s).get("integrity")
    except (OSError, ValueError):
        integrity = None
    why = verify(restored, integrity, prefix="".join(f"{k}/" for k in subtree))
    if why:
        raise CheckpointCorruptError(f"{ckpt.directory}/{s}: unusable checkpoint ({why})")
    return restored
