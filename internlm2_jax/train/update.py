"""The one optimizer step every stage uses: a task's loss → accumulated gradients → guarded update → metrics.

A *task* (causal LM, LoRA, reward model, DPO, PPO actor / critic, ...) only says how to compute its loss:

    loss(trainable, frozen, batch, rng) -> (objective_sum, sums)

`objective_sum` is differentiated w.r.t. `trainable`; `sums["weight"]` normalises it (token count for
the causal LM, 1 for losses that are already means). Every other entry of `sums` is a metric summed over
micro-batches and divided by the total weight, so a metric that is a per-token sum comes out as a mean.
`frozen` (a LoRA base, a frozen reference, nothing) is passed through untouched and never differentiated.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Protocol

import flax
import jax
import jax.numpy as jnp
import optax

Batch = dict[str, Any]
LossFn = Callable[[Any, Any, Batch, Optional[jax.Array]], tuple[jax.Array, dict]]


class Task(Protocol):
    """What a stage contributes to the step (see `internlm2_jax.train.trainer.Trainer`)."""

    name: str

    def loss(self, trainable: Any, frozen: Any, batch: Batch, rng: Optional[jax.Array]) -> tuple[jax.Array, dict]:
        """`(objective_sum, sums)` with `sums["weight"]` the normaliser (see the module docstring)."""

    def boxed_params(self, rng: jax.Array) -> Any:
        """Fresh trainable params whose leaves carry logical axes (`nn.LogicallyPartitioned`)."""


@flax.struct.dataclass
class TrainState:
    """Everything an optimizer step updates. `params` are the trainable fp32 master weights."""

    step: jax.Array
    params: Any
    opt_state: Any
    skipped: jax.Array  # consecutive non-finite steps that were skipped


def new_state(params: Any, tx: optax.GradientTransformation) -> TrainState:
    """Step 0, a fresh optimizer state around `params` (plain leaves)."""
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      skipped=jnp.zeros((), jnp.int32))


def split_micro_batches(batch: Batch, n: int) -> Batch:
    """`[B, ...]` leaves → `[n, B/n, ...]`; micro-batch i takes rows i, i+n, ... so every device keeps its own
    rows (no reshuffle). Scalars (coefficients) are left alone and broadcast to every micro-batch."""
    def split(x):
        if jnp.ndim(x) == 0:
            return x
        b = x.shape[0]
        if b % n:
            raise ValueError(f"batch size {b} is not divisible by grad_accum={n}")
        return x.reshape(b // n, n, *x.shape[1:]).swapaxes(0, 1)

    return jax.tree.map(split, batch)


def accumulate_gradients(loss: LossFn, trainable: Any, frozen: Any, batch: Batch, rng: Optional[jax.Array],
                         grad_accum: int = 1) -> tuple[jax.Array, Any, dict]:
    """Normalised objective, gradients and metrics over `grad_accum` micro-batches of `batch`.

    Returns `(objective, grads, metrics)`: `objective = Σ objective_sum / Σ weight`, grads likewise,
    `metrics[k] = Σ sums[k] / Σ weight` and `metrics["weight"] = Σ weight`. Micro-batch i gets
    `fold_in(rng, i)` (the rng itself when there is one micro-batch).
    """
    grad_fn = jax.value_and_grad(loss, has_aux=True)
    if grad_accum == 1:
        (total, sums), grads = grad_fn(trainable, frozen, batch, rng)
    else:
        scalars = {k: v for k, v in batch.items() if jnp.ndim(v) == 0}
        micro = split_micro_batches({k: v for k, v in batch.items() if k not in scalars}, grad_accum)

        def one(mb, i):
            r = None if rng is None else jax.random.fold_in(rng, i)
            return grad_fn(trainable, frozen, {**mb, **scalars}, r)

        shapes = jax.eval_shape(one, jax.tree.map(lambda x: x[0], micro), 0)
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

        def body(acc, xs):
            return jax.tree.map(jnp.add, acc, one(*xs)), None

        ((total, sums), grads), _ = jax.lax.scan(body, zeros, (micro, jnp.arange(grad_accum)))
    weight = jnp.maximum(sums["weight"], 1e-9)
    grads = jax.tree.map(lambda g: g / weight, grads)
    metrics = {k: v / weight for k, v in sums.items() if k != "weight"}
    metrics["weight"] = sums["weight"]
    return total / weight, grads, metrics


def finite_update(tx: optax.GradientTransformation, params: Any, opt_state: Any, grads: Any,
                  loss: jax.Array) -> tuple[Any, Any, jax.Array, jax.Array]:
    """`tx` step applied only when `loss` and the gradients' global norm are finite; otherwise
    `params` and `opt_state` come back unchanged. Returns (params, opt_state, finite, grad_norm).

    A `lax.cond`, not a select over every leaf: the common path costs only the update itself.
    """
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def apply(p, o):
        updates, new_opt = tx.update(grads, o, p)
        return optax.apply_updates(p, updates), new_opt

    params, opt_state = jax.lax.cond(finite, apply, lambda p, o: (p, o), params, opt_state)
    return params, opt_state, finite, grad_norm


def guarded_update(tx: optax.GradientTransformation, state: TrainState, grads: Any,
                   loss: jax.Array) -> tuple[TrainState, jax.Array, jax.Array]:
    """`finite_update` on a `TrainState`: `step` advances and `skipped` resets only on a finite step,
    otherwise `skipped` counts consecutive skips. Returns (state, finite, grad_norm)."""
    params, opt_state, finite, grad_norm = finite_update(tx, state.params, state.opt_state, grads, loss)
    return TrainState(step=state.step + finite.astype(jnp.int32), params=params, opt_state=opt_state,
                      skipped=jnp.where(finite, 0, state.skipped + 1)), finite, grad_norm


def update_step(loss: LossFn, tx: optax.GradientTransformation, state: TrainState, frozen: Any, batch: Batch,
                rng: Optional[jax.Array] = None, *, grad_accum: int = 1,
                lr_fn: Optional[Callable[[Any], Any]] = None) -> tuple[TrainState, dict]:
    """One guarded optimizer step of `state.params` on `batch`; returns `(state, metrics)`.

    Metrics: the task's (normalised), `loss` (the task's `loss` metric if it reports one, else the objective),
    `objective`, `grad_norm`, `finite`, `skipped` and `lr` (when `lr_fn` is given, at the step's start).
    """
    objective, grads, metrics = accumulate_gradients(loss, state.params, frozen, batch, rng, grad_accum)
    new_state, finite, grad_norm = guarded_update(tx, state, grads, objective)
    metrics = {"loss": objective, **metrics, "objective": objective, "grad_norm": grad_norm, "finite": finite,
               "skipped": new_state.skipped}
    if lr_fn is not None:
        metrics["lr"] = jnp.asarray(lr_fn(state.step), jnp.float32)
    return new_state, metrics
