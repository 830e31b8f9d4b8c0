"""`Trainer`: derives the shardings of a task's state and jits its `update_step` for a mesh.

The same object trains every stage (causal LM, LoRA / QLoRA, reward model, DPO, PPO actor and critic);
only the task changes. The same code runs on 1 CPU, fake CPU devices, GPUs and TPU pods; only `mesh` changes.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.sharding import AbstractMesh, Mesh, NamedSharding

from internlm2_jax.params_loading import place
from internlm2_jax.sharding import LOGICAL_RULES, data_sharding, logical_to_sharding, replicated
from internlm2_jax.train.update import Batch, Task, TrainState, new_state, update_step


def mesh_context(mesh: Mesh | AbstractMesh):
    """Context active while tracing: the mesh plus the logical rules table. An `AbstractMesh` (devices not on
    this host, e.g. for `jax.export`) is entered as the abstract mesh."""
    stack = contextlib.ExitStack()
    set_mesh = jax.sharding.use_abstract_mesh if isinstance(mesh, AbstractMesh) else jax.set_mesh
    stack.enter_context(set_mesh(mesh))
    stack.enter_context(nn.logical_axis_rules(LOGICAL_RULES))
    return stack


def batch_shardings(mesh: Mesh, batch: Batch, task: Any = None) -> dict[str, NamedSharding]:
    """Per-key shardings of a batch: the task's `batch_sharding(mesh, key, rank)` when it has one, else
    `[B, S, ...]` over (batch, length), `[B]` over batch and scalars replicated."""
    custom = getattr(task, "batch_sharding", None)
    out = {}
    for k, v in batch.items():
        sh = custom(mesh, k, np.ndim(v)) if custom is not None else None
        out[k] = sh if sh is not None else data_sharding(mesh, np.ndim(v))
    return out


class Trainer:
    """Sharded state + jitted `step(state, batch) -> (state, metrics)` for one `Task` on one mesh.

    `task.loss(trainable, frozen, batch, rng)` is the only stage-specific piece; `task.boxed_params(rng)`
    gives the trainable tree with logical axes (shardings come from them); `task.frozen_shardings(mesh)`
    (optional) places the frozen part (`set_frozen`); `task.grad_accum` (default 1) micro-batches per step;
    `task.weight_name` (optional) also reports the loss weight under that name (`tokens`).
    The step's rng is `fold_in(key(seed), state.step)` (LoRA dropout; unused by deterministic tasks).
    """

    def __init__(self, task: Task, tx: optax.GradientTransformation, mesh: Mesh, *,
                 lr_fn: Optional[Callable[[Any], Any]] = None, seed: int = 0):
        self.task, self.tx, self.mesh, self.lr_fn, self.seed = task, tx, mesh, lr_fn, seed
        self.grad_accum = int(getattr(task, "grad_accum", 1))
        abstract = jax.eval_shape(self._boxed_state, jax.random.key(0))
        self.state_shardings = logical_to_sharding(nn.get_partition_spec(abstract), mesh)
        get_frozen = getattr(task, "frozen_shardings", None)
        self.frozen_shardings = get_frozen(mesh) if get_frozen is not None else None
        self.frozen: Any = None
        self._init = jax.jit(self._init_fn, out_shardings=self.state_shardings)
        self._fresh = jax.jit(lambda p: new_state(p, self.tx), out_shardings=self.state_shardings)
        self._steps: dict[Any, Any] = {}
        self._evals: dict[Any, Any] = {}

    # ---- state -------------------------------------------------------------------------------------
    def _boxed_state(self, rng: jax.Array) -> TrainState:
        return new_state(self.task.boxed_params(rng), self.tx)

    def _init_fn(self, rng: jax.Array) -> TrainState:
        return nn.meta.unbox(self._boxed_state(rng))

    @property
    def param_shardings(self) -> Any:
        return self.state_shardings.params

    def abstract_state(self) -> TrainState:
        """Shapes/dtypes/shardings of the state without allocating it."""
        shapes = jax.eval_shape(self._init_fn, jax.random.key(0))
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                            shapes, self.state_shardings)

    def init_state(self, rng: jax.Array) -> TrainState:
        """The state created directly with its final shardings (never whole on one host)."""
        with mesh_context(self.mesh):
            return self._init(rng)

    def state_from_params(self, params: Any) -> TrainState:
        """A fresh state (step 0, new optimizer state) around existing trainable params (warm start)."""
        config = getattr(self.task, "config", None)  # the model's master-weight dtype, when the task has a model
        placed = place(params, self.state_shardings.params, getattr(config, "weight_dtype", None))
        with mesh_context(self.mesh):
            return self._fresh(placed)

    def set_frozen(self, frozen: Any) -> None:
        """The frozen part of the task (already placed, e.g. by `task.prepare_frozen`)."""
        self.frozen = frozen

    # ---- steps -------------------------------------------------------------------------------------
    def _key(self, batch: Batch) -> tuple:
        return tuple(sorted((k, np.ndim(v)) for k, v in batch.items()))

    def _step_fn(self, state: TrainState, frozen: Any, batch: Batch) -> tuple[TrainState, dict]:
        rng = jax.random.fold_in(jax.random.key(self.seed), state.step)
        state, metrics = update_step(self.task.loss, self.tx, state, frozen, batch, rng,
                                     grad_accum=self.grad_accum, lr_fn=self.lr_fn)
        if getattr(self.task, "weight_name", None):  # e.g. the causal LM's weight is its token count
            metrics[self.task.weight_name] = metrics["weight"]
        return state, metrics

    def jitted_step(self, batch: Batch) -> Any:
        """The jitted `(state, frozen, batch) -> (state, metrics)` for batches shaped like `batch` (arrays or
        `ShapeDtypeStruct`s), with explicit shardings; `step` runs it, `jax.export` can lower it."""
        key = self._key(batch)
        if key not in self._steps:
            self._steps[key] = jax.jit(
                self._step_fn, in_shardings=(self.state_shardings, self.frozen_shardings,
                                             batch_shardings(self.mesh, batch, self.task)),
                out_shardings=(self.state_shardings, replicated(self.mesh)), donate_argnums=0)
        return self._steps[key]

    def step(self, state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
        """One optimizer step on a global batch (device arrays or host numpy); `state` is donated."""
        step = self.jitted_step(batch)
        batch = jax.device_put(batch, batch_shardings(self.mesh, batch, self.task))  # no-op when already placed
        with mesh_context(self.mesh):
            return step(state, self.frozen, batch)

    def step_host(self, state: TrainState, local_batch: Batch) -> tuple[TrainState, dict]:
        """`step` on this process's share of the global batch (host numpy, multi-host safe: each process
        passes its rows; replicated entries such as pair tables or coefficients are passed whole)."""
        shardings = batch_shardings(self.mesh, local_batch, self.task)
        batch = {k: jax.make_array_from_process_local_data(shardings[k], np.asarray(v))
                 for k, v in local_batch.items()}
        return self.step(state, batch)

    def eval_loss(self, params: Any, batch: Batch) -> dict:
        """Metric sums of `batch` without gradients: the task's `eval_sums(trainable, frozen, batch)` when it
        has one (the causal LM's `loss_sum/count/correct`), else its loss's unnormalised `sums`."""
        key = self._key(batch)
        if key not in self._evals:
            sums = getattr(self.task, "eval_sums", None) or (lambda p, f, b: self.task.loss(p, f, b, None)[1])
            fn = lambda p, f, b: sums(p, f, b)  # noqa: E731
            self._evals[key] = jax.jit(fn, in_shardings=(self.param_shardings, self.frozen_shardings,
                                                         batch_shardings(self.mesh, batch, self.task)),
                                       out_shardings=replicated(self.mesh))
        with mesh_context(self.mesh):
            return self._evals[key](params, self.frozen, batch)
