"""Reward-model training: jitted step on token-budget packed batches, per-condition pairwise accuracy."""

from __future__ import annotations

import collections
import functools
from typing import Any, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from internlm2_jax.config import ModelConfig
from internlm2_jax.rlhf.reward_loss import reward_loss
from internlm2_jax.rlhf.reward_model import Params, gather_scores, token_values


def batch_scores(config: ModelConfig, params: Params, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """(chosen, rejected) scores `[M]` of one packed batch (see `pack_pairs`)."""
    values = token_values(config, params, batch["tokens"], positions=batch["positions"],
                          segment_ids=batch["segment_ids"])
    return gather_scores(values, batch["chosen_index"]), gather_scores(values, batch["rejected_index"])


@functools.partial(jax.jit, static_argnames=("config", "tx", "gamma", "barrier_weight"), donate_argnums=(1, 2))
def rm_train_step(config: ModelConfig, params: Params, opt_state: Any, batch: dict[str, jax.Array], *,
                  tx: optax.GradientTransformation, gamma: float = 2.0,
                  barrier_weight: float = 0.02) -> tuple[Params, Any, dict[str, jax.Array]]:
    """One optimizer step on the mean reward loss of a packed batch."""
    def loss_fn(p):
        rc, rr = batch_scores(config, p, batch)
        return reward_loss(rc, rr, batch["pair_mask"], gamma=gamma, barrier_weight=barrier_weight)

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return params, opt_state, {"loss": loss, "grad_norm": optax.tree.norm(grads), **metrics}


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
