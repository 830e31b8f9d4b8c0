"""Reward-model training: jitted step on token-budget packed batches, per-condition pairwise accuracy.

`rm_train_step` is the plain single-device jit; `RMTrainer` places params / optimizer state on a
`jax.sharding.Mesh` (see `internlm2_jax.rlhf.mesh`) and jits the same step with explicit shardings.
"""

from __future__ import annotations

import collections
import functools
from typing import Any, Iterable, Optional, Sequence

import jax
import numpy as np
import optax
from jax.sharding import Mesh

from internlm2_jax.config import ModelConfig
from internlm2_jax.rlhf.mesh import batch_spec, critic_shardings, default_mesh, mesh_context, opt_shardings, place
from internlm2_jax.rlhf.reward_loss import reward_loss
from internlm2_jax.rlhf.reward_model import Params, gather_scores, token_values
from internlm2_jax.sharding import replicated
from internlm2_jax.train.step import finite_update


def batch_scores(config: ModelConfig, params: Params, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """(chosen, rejected) scores `[M]` of one packed batch (see `pack_pairs`)."""
    values = token_values(config, params, batch["tokens"], positions=batch["positions"],
                          segment_ids=batch["segment_ids"])
    return gather_scores(values, batch["chosen_index"]), gather_scores(values, batch["rejected_index"])


def _rm_step(config: ModelConfig, params: Params, opt_state: Any, batch: dict[str, jax.Array], *,
             tx: optax.GradientTransformation, gamma: float = 2.0,
             barrier_weight: float = 0.02) -> tuple[Params, Any, dict[str, jax.Array]]:
    """One optimizer step on the mean reward loss of a packed batch (skipped when not finite)."""
    def loss_fn(p):
        rc, rr = batch_scores(config, p, batch)
        return reward_loss(rc, rr, batch["pair_mask"], gamma=gamma, barrier_weight=barrier_weight)

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    params, opt_state, finite, grad_norm = finite_update(tx, params, opt_state, grads, loss)
    return params, opt_state, {"loss": loss, "grad_norm": grad_norm, "finite": finite, **metrics}


rm_train_step = jax.jit(_rm_step, static_argnames=("config", "tx", "gamma", "barrier_weight"), donate_argnums=(1, 2))


_ROW_KEYS = ("tokens", "positions", "segment_ids")


def _pair_spec(mesh: Mesh, key: str) -> Any:
    """Packed rows `[R, L]` split over the batch axes; the pair tables (`*_index [M, 2]`, `[M]`) replicated."""
    return batch_spec(mesh, 2) if key in _ROW_KEYS else replicated(mesh)


class RMTrainer:
    """Sharded RM training: `params = trainer.place(params)`, `opt = trainer.init_opt(params)`, then
    `params, opt, metrics = trainer.step(params, opt, batch)` (host numpy batches from `pack_pairs`)."""

    def __init__(self, config: ModelConfig, tx: optax.GradientTransformation, mesh: Optional[Mesh] = None, *,
                 gamma: float = 2.0, barrier_weight: float = 0.02):
        self.config, self.tx, self.mesh = config, tx, mesh if mesh is not None else default_mesh()
        self.param_shardings = critic_shardings(config, self.mesh)
        self.opt_shardings = opt_shardings(config, tx, self.mesh, critic=True)
        self._fn = functools.partial(_rm_step, config, tx=tx, gamma=gamma, barrier_weight=barrier_weight)
        self._jits: dict[Any, Any] = {}

    def place(self, params: Params) -> Params:
        """RM params (plain or boxed, host or device) on their mesh shardings."""
        return place(params, self.param_shardings, self.config.weight_dtype)

    def init_opt(self, params: Params) -> Any:
        with mesh_context(self.mesh):
            return jax.jit(self.tx.init, out_shardings=self.opt_shardings)(params)

    def step(self, params: Params, opt_state: Any, batch: dict[str, np.ndarray]) -> tuple[Params, Any, dict]:
        """One sharded optimizer step (params and optimizer state are donated)."""
        shardings = {k: _pair_spec(self.mesh, k) for k in batch}
        key = tuple(sorted(shardings))
        if key not in self._jits:
            rep = replicated(self.mesh)
            self._jits[key] = jax.jit(self._fn, in_shardings=(self.param_shardings, self.opt_shardings, shardings),
                                      out_shardings=(self.param_shardings, self.opt_shardings, rep),
                                      donate_argnums=(0, 1))
        batch = {k: jax.device_put(np.asarray(v), shardings[k]) for k, v in batch.items()}
        with mesh_context(self.mesh):
            return self._jits[key](params, opt_state, batch)


@functools.partial(jax.jit, static_argnames=("config",))
def _eval_scores(config: ModelConfig, params: Params, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    return batch_scores(config, params, batch)


def evaluate(config: ModelConfig, params: Params, batches: Iterable[dict[str, np.ndarray]],
             condition_names: Sequence[str]) -> dict[str, float]:
    """Pairwise accuracy overall (`accuracy`) and per condition (`accuracy/<name>`), plus mean margin."""
    hits: dict[str, list[float]] = collections.defaultdict(list)
    margins = []
    for b in batches:
        rc, rr = (np.asarray(x) for x in _eval_scores(config, params, b))
        for i in np.nonzero(b["pair_mask"])[0]:
            cid = int(b["condition_id"][i])
            name = condition_names[cid] if cid >= 0 else "none"
            hits[name].append(float(rc[i] > rr[i]))
            hits["all"].append(float(rc[i] > rr[i]))
            margins.append(float(rc[i] - rr[i]))
    out = {f"accuracy/{k}": float(np.mean(v)) for k, v in hits.items() if k != "all"}
    out["accuracy"] = float(np.mean(hits["all"])) if hits["all"] else float("nan")
    out["margin"] = float(np.mean(margins)) if margins else float("nan")
    return out
