"""The reward-model task: the conditional ranking + barrier loss on token-budget packed pairs.

`RewardModelTask` plugs into `internlm2_jax.train.trainer.Trainer` (params `{"backbone", "v_head"}` sharded by
their logical axes; packed rows `[R, L]` split over the batch axes, the pair tables replicated).
`rm_train_step` is the same step jitted on plain trees without a mesh; `evaluate` reports per-condition
pairwise accuracy.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Any, Iterable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding

from internlm2_jax.config import ModelConfig
from internlm2_jax.rlhf.reward_loss import reward_loss
from internlm2_jax.rlhf.reward_model import Params, gather_scores, init_reward_params, token_values
from internlm2_jax.sharding import replicated
from internlm2_jax.train.update import TrainState, update_step

ROW_KEYS = ("tokens", "positions", "segment_ids")  # packed rows [R, L]; everything else is a pair table


def batch_scores(config: ModelConfig, params: Params, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """(chosen, rejected) scores `[M]` of one packed batch (see `pack_pairs`)."""
    values = token_values(config, params, batch["tokens"], positions=batch["positions"],
                          segment_ids=batch["segment_ids"])
    return gather_scores(values, batch["chosen_index"]), gather_scores(values, batch["rejected_index"])


@dataclasses.dataclass(frozen=True)
class RewardModelTask:
    """Mean reward loss over the valid pairs of a packed batch (weight 1: already a mean; no accumulation,
    since the pair tables index rows of the whole batch)."""

    config: ModelConfig
    gamma: float = 2.0
    barrier_weight: float = 0.02
    name: str = "reward_model"

    def loss(self, params: Params, frozen: Any, batch: dict, rng: Optional[jax.Array]) -> tuple[jax.Array, dict]:
        rc, rr = batch_scores(self.config, params, batch)
        loss, metrics = reward_loss(rc, rr, batch["pair_mask"], gamma=self.gamma, barrier_weight=self.barrier_weight)
        tokens = jnp.sum(batch["segment_ids"] > 0).astype(jnp.float32)
        return loss, {"weight": jnp.ones((), jnp.float32), "tokens": tokens, **metrics}

    def boxed_params(self, rng: jax.Array) -> Params:
        return init_reward_params(self.config, rng, boxed=True)

    def batch_sharding(self, mesh: Mesh, key: str, rank: int) -> Optional[NamedSharding]:
        return None if key in ROW_KEYS else replicated(mesh)


@functools.partial(jax.jit, static_argnames=("config", "tx", "gamma", "barrier_weight"), donate_argnums=(1, 2))
def rm_train_step(config: ModelConfig, params: Params, opt_state: Any, batch: dict[str, jax.Array], *,
                  tx: optax.GradientTransformation, gamma: float = 2.0,
                  barrier_weight: float = 0.02) -> tuple[Params, Any, dict[str, jax.Array]]:
    """One guarded step of `RewardModelTask` on plain trees (no mesh): `(params, opt_state, metrics)`."""
    task = RewardModelTask(config, gamma, barrier_weight)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state,
                       skipped=jnp.zeros((), jnp.int32))
    state, metrics = update_step(task.loss, tx, state, None, batch)
    return state.params, state.opt_state, metrics


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
