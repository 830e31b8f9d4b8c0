"""Sharded train state and the jitted train step (grad accumulation, mixed precision, skip-on-NaN)."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from internlm2_jax.config import ModelConfig
from internlm2_jax.model import InternLM2, init_params
from internlm2_jax.sharding import LOGICAL_RULES, data_sharding, logical_to_sharding, replicated, validate
from internlm2_jax.train.loss import chunked_cross_entropy, next_token_targets

Batch = dict[str, jax.Array]  # tokens [B, S] and optional segment_ids / positions / loss_mask [B, S]


@flax.struct.dataclass
class TrainState:
    """Everything a step updates. `params` are fp32 master weights (plain arrays)."""

    step: jax.Array
    params: Any
    opt_state: Any
    skipped: jax.Array  # consecutive non-finite steps that were skipped


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Knobs of the train step that are not model or optimizer hyper-parameters."""

    grad_accum: int = 1
    """Micro-batches per step; the global batch is split into this many, gradients summed."""
    loss_chunk: int = 512
    """Positions per cross-entropy chunk (bounds the fp32 logits buffer to `[B, chunk, V]`)."""
    z_loss: float = 0.0
    """Weight of the z-loss `logsumexp²` (0 disables)."""


def mesh_context(mesh: Mesh):
    """Context active while tracing: the mesh plus the logical rules table."""
    stack = contextlib.ExitStack()
    stack.enter_context(jax.set_mesh(mesh))
    stack.enter_context(nn.logical_axis_rules(LOGICAL_RULES))
    return stack


def loss_fn(config: ModelConfig, params: Any, batch: Batch, step_cfg: StepConfig) -> tuple[jax.Array, dict]:
    """Sum of token losses (for accumulation) and metric sums over `batch`."""
    hidden = InternLM2(config).apply({"params": params}, batch["tokens"], batch.get("positions"),
                                     batch.get("segment_ids"), head=False)
    targets, weights = next_token_targets(batch["tokens"], batch.get("loss_mask"), batch.get("segment_ids"))
    sums = chunked_cross_entropy(hidden, params["output"], targets, weights,
                                 chunk_size=step_cfg.loss_chunk, z_loss=step_cfg.z_loss)
    return sums["loss_sum"] + sums["z_loss_sum"], sums


def loss_and_grads(config: ModelConfig, params: Any, batch: Batch, step_cfg: StepConfig):
    """Mean loss, mean gradients and metric sums, accumulating over `step_cfg.grad_accum` micro-batches."""
    grad_fn = jax.value_and_grad(lambda p, b: loss_fn(config, p, b, step_cfg), has_aux=True)
    a = step_cfg.grad_accum
    if a == 1:
        (_, sums), grads = grad_fn(params, batch)
    else:
        # Micro-batch i takes rows i, i+a, ... so every device keeps its own rows (no reshuffle).
        def split(x):
            b = x.shape[0]
            if b % a:
                raise ValueError(f"batch size {b} is not divisible by grad_accum={a}")
            return x.reshape(b // a, a, *x.shape[1:]).swapaxes(0, 1)

        micro = jax.tree.map(split, batch)
        zero = jax.tree.map(jnp.zeros_like, params)

        def body(carry, mb):
            g_acc, s_acc = carry
            (_, sums), g = grad_fn(params, mb)
            return (jax.tree.map(jnp.add, g_acc, g), jax.tree.map(jnp.add, s_acc, sums)), None

        init_sums = {k: jnp.zeros((), jnp.float32) for k in ("loss_sum", "z_loss_sum", "correct", "count")}
        (grads, sums), _ = jax.lax.scan(body, (zero, init_sums), micro)
    count = jnp.maximum(sums["count"], 1.0)
    grads = jax.tree.map(lambda g: g / count, grads)
    return sums["loss_sum"] / count, grads, sums


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


class ShardedState:
    """Sharded-state plumbing shared by `Trainer` and `LoraTrainer`.

    Subclasses define `_boxed_state(rng)` (a `TrainState` whose leaves carry logical axes) and `mesh`;
    `_setup_state()` derives `state_shardings` from those names and the jitted initialiser.
    """

    mesh: Mesh

    def _boxed_state(self, rng: jax.Array) -> TrainState:
        raise NotImplementedError

    def _setup_state(self) -> None:
        abstract = jax.eval_shape(self._boxed_state, jax.random.key(0))
        self.state_shardings = logical_to_sharding(nn.get_partition_spec(abstract), self.mesh)
        self._init = jax.jit(self._init_fn, out_shardings=self.state_shardings)

    def _init_fn(self, rng: jax.Array) -> TrainState:
        return nn.meta.unbox(self._boxed_state(rng))

    def abstract_state(self) -> TrainState:
        """Shapes/dtypes/shardings of the state without allocating it."""
        shapes = jax.eval_shape(self._init_fn, jax.random.key(0))
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                            shapes, self.state_shardings)

    def init_state(self, rng: jax.Array) -> TrainState:
        """The state created directly with its final shardings (never whole on one host)."""
        with mesh_context(self.mesh):
            return self._init(rng)


class Trainer(ShardedState):
    """Builds the sharded state and a jitted `step(state, batch) -> (state, metrics)` for a mesh.

    The same code runs on 1 CPU, fake CPU devices, GPUs and TPU pods; only `mesh` changes.
    """

    def __init__(self, config: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh,
                 step_cfg: StepConfig = StepConfig(), lr_fn: Optional[Callable[[Any], Any]] = None):
        self.config, self.tx, self.mesh, self.step_cfg, self.lr_fn = config, tx, mesh, step_cfg, lr_fn
        validate(config, mesh)
        self._setup_state()
        self._step = jax.jit(self._step_fn, in_shardings=(self.state_shardings, data_sharding(mesh)),
                             out_shardings=(self.state_shardings, replicated(mesh)), donate_argnums=0)

    def _boxed_state(self, rng):
        params = init_params(self.config, rng)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=self.tx.init(params),
                          skipped=jnp.zeros((), jnp.int32))

    def state_from_params(self, params: Any) -> TrainState:
        """A fresh state (step 0, new optimizer state) around existing params (warm start / HF)."""
        params = nn.meta.unbox(params)
        shard = jax.jit(lambda p: TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=self.tx.init(p),
                                             skipped=jnp.zeros((), jnp.int32)),
                        out_shardings=self.state_shardings)
        with mesh_context(self.mesh):
            return shard(jax.tree.map(lambda x, s: jax.device_put(x.astype(self.config.weight_dtype), s),
                                      params, self.state_shardings.params))

    def _step_fn(self, state: TrainState, batch: Batch):
        loss, grads, sums = loss_and_grads(self.config, state.params, batch, self.step_cfg)
        new_state, finite, grad_norm = guarded_update(self.tx, state, grads, loss)
        metrics = {
            "loss": loss, "grad_norm": grad_norm, "tokens": sums["count"],
            "accuracy": sums["correct"] / jnp.maximum(sums["count"], 1.0),
            "z_loss": sums["z_loss_sum"] / jnp.maximum(sums["count"], 1.0),
            "finite": finite, "skipped": new_state.skipped,
        }
        if self.lr_fn is not None:
            metrics["lr"] = jnp.asarray(self.lr_fn(state.step), jnp.float32)
        return new_state, metrics

    def step(self, state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
        """One optimizer step on a global batch (arrays or host numpy, `[B, S]`)."""
        with mesh_context(self.mesh):
            return self._step(state, batch)

    def eval_loss(self, params: Any, batch: Batch) -> dict:
        """Metric sums of `batch` without gradients (for validation perplexity)."""
        if not hasattr(self, "_eval"):
            fn = lambda p, b: loss_fn(self.config, p, b, self.step_cfg)[1]
            self._eval = jax.jit(fn, in_shardings=(self.state_shardings.params, data_sharding(self.mesh)),
                                 out_shardings=replicated(self.mesh))
        with mesh_context(self.mesh):
            return self._eval(params, batch)
