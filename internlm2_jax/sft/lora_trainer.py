"""`LoraTrainer`: `Trainer`'s interface (`mesh/init_state/abstract_state/step/eval_loss`) for LoRA / QLoRA.

The state's `params` are the adapters only (`{"a": [*lead, in, r], "b": [*lead, r, *out]}` per target, see
`lora.py`), so `run_loop` checkpoints adapters + optimizer state and nothing of the frozen base. The base
(plain, or int4 `Int4Weight` / int8 `QuantizedWeight` for QLoRA, see `quantize.py`) lives on the trainer,
sharded by the model's logical rules, and is passed to the jitted step as a non-donated input (dequantized
inside the loss). Adapter shardings follow their base weight:

    A [*lead, in, r]   logical (*lead_axes, first in-axis, None)
    B [*lead, r, *out] logical (*lead_axes, None, *out_axes)

e.g. wqkv `(layers, embed, kv_heads, qkv_group, head_dim)` → A `(layers, embed, None)`,
B `(layers, None, kv_heads, qkv_group, head_dim)`; A's flattened `in` dim is split like its first factor.
Quantized bases: int8 q keeps the weight's axes, its scale None on the in dims; int4's packed q keeps the
weight's axes (packed dim halved), its block scales None on the packed dim.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, PartitionSpec as P

from internlm2_jax.config import ModelConfig
from internlm2_jax.model import abstract_params
from internlm2_jax.sft.lora import LoraConfig, apply_lora, init_lora
from internlm2_jax.sft.quantize import IN_NDIM, OUT_NDIM, Int4Weight, QuantizedWeight, int4_axis, quantize_base
from internlm2_jax.sharding import data_sharding, logical_to_sharding, replicated, validate
from internlm2_jax.train.step import (Batch, ShardedState, StepConfig, TrainState, guarded_update, loss_fn,
                                      mesh_context)


def _split_axes(name: str, axes: tuple) -> tuple[tuple, tuple, tuple]:
    n_in, n_out = IN_NDIM[name], OUT_NDIM[name]
    lead = len(axes) - n_in - n_out
    return tuple(axes[:lead]), tuple(axes[lead:lead + n_in]), tuple(axes[lead + n_in:])


def adapter_logical_axes(base_specs: Any, targets: tuple[str, ...]) -> dict:
    """Logical `PartitionSpec`s of the adapters from the base params' specs (same tree as `init_lora`)."""
    out = {}
    for k, v in base_specs.items():
        if isinstance(v, dict):
            sub = adapter_logical_axes(v, targets)
            if sub:
                out[k] = sub
        elif k in targets:
            lead, ins, outs = _split_axes(k, tuple(v))
            out[k] = {"a": P(*lead, ins[0], None), "b": P(*lead, None, *outs)}
    return out


def quantized_logical_axes(base_specs: Any, targets: tuple[str, ...], bits: int = 8) -> Any:
    """Specs of `quantize_base(base, targets, bits)`: targets become
    bits=8: `QuantizedWeight(q=spec, scale=spec with None on the in dims)`;
    bits=4: `Int4Weight(q=spec, scale=spec with None on the packed axis)`."""
    out = {}
    for k, v in base_specs.items():
        if isinstance(v, dict):
            out[k] = quantized_logical_axes(v, targets, bits)
        elif k in targets:
            lead, ins, outs = _split_axes(k, tuple(v))
            if bits == 4:
                ax = int4_axis(k, len(v))
                out[k] = Int4Weight(q=v, scale=P(*(None if i == ax else a for i, a in enumerate(v))), axis=ax)
            else:
                out[k] = QuantizedWeight(q=v, scale=P(*lead, *([None] * len(ins)), *outs))
        else:
            out[k] = v
    return out


class LoraTrainer(ShardedState):
    """Trains adapters on a frozen base; drop-in for `Trainer` inside `run_loop`.

    `quantize="int4"` / `"int8"` stores the target weights of the base as blockwise int4 (`lora.qlora_block`
    weights per bf16 scale) / per-channel int8 (QLoRA); the others stay as given. Call `set_base(params)`
    (plain or boxed full params) before `step`.
    """

    def __init__(self, config: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh, lora: LoraConfig,
                 step_cfg: StepConfig = StepConfig(), lr_fn: Optional[Callable[[Any], Any]] = None,
                 quantize: Optional[str] = None, seed: int = 0):
        if quantize not in (None, "int4", "int8"):
            raise ValueError(f"quantize must be None, 'int4' or 'int8', got {quantize!r}")
        validate(config, mesh)
        self.config, self.tx, self.mesh, self.lora, self.step_cfg = config, tx, mesh, lora, step_cfg
        self.lr_fn, self.quantize, self.seed = lr_fn, quantize, seed
        abstract = abstract_params(config)
        base_specs = nn.get_partition_spec(abstract)
        self._shapes = nn.meta.unbox(abstract)
        self.adapter_specs = adapter_logical_axes(base_specs, lora.targets)
        self.full_shardings = logical_to_sharding(base_specs, mesh)
        self.bits = {None: None, "int4": 4, "int8": 8}[quantize]
        self.base_shardings = (logical_to_sharding(quantized_logical_axes(base_specs, lora.targets, self.bits), mesh)
                               if quantize else self.full_shardings)
        self._setup_state()
        self.base: Any = None
        self._step = jax.jit(self._step_fn, in_shardings=(self.state_shardings, self.base_shardings,
                                                          data_sharding(mesh)),
                             out_shardings=(self.state_shardings, replicated(mesh)), donate_argnums=0)

    # ---- state -------------------------------------------------------------------------------------
    def _boxed_state(self, rng: jax.Array) -> TrainState:
        ads = init_lora(self._shapes, self.lora, rng)
        ads = jax.tree.map(lambda x, s: nn.LogicallyPartitioned(x, tuple(s)), ads, self.adapter_specs,
                           is_leaf=lambda x: isinstance(x, P))
        return TrainState(step=jnp.zeros((), jnp.int32), params=ads, opt_state=self.tx.init(ads),
                          skipped=jnp.zeros((), jnp.int32))

    def set_base(self, params: Any) -> None:
        """Places the frozen base on the mesh (quantizing its target weights for QLoRA)."""
        params = jax.tree.map(lambda x, s: jax.device_put(x, s), nn.meta.unbox(params), self.full_shardings)
        if self.bits is not None:
            quant = lambda p: quantize_base(p, self.lora.targets, self.bits, self.lora.qlora_block)  # noqa: E731
            with mesh_context(self.mesh):
                params = jax.jit(quant, out_shardings=self.base_shardings)(params)
        self.base = params

    # ---- steps -------------------------------------------------------------------------------------
    def _loss(self, adapters: Any, base: Any, batch: Batch, rng: Optional[jax.Array]) -> tuple[jax.Array, dict]:
        merged = apply_lora(base, adapters, self.lora.alpha, self.lora.rank, dropout=self.lora.dropout, rng=rng)
        return loss_fn(self.config, merged, batch, self.step_cfg)

    def _grads(self, adapters: Any, base: Any, batch: Batch, rng: jax.Array) -> tuple[Any, dict]:
        grad_fn = jax.value_and_grad(self._loss, has_aux=True)
        a = self.step_cfg.grad_accum
        if a == 1:
            (_, sums), grads = grad_fn(adapters, base, batch, rng)
            return grads, sums
        micro = jax.tree.map(lambda x: x.reshape(x.shape[0] // a, a, *x.shape[1:]).swapaxes(0, 1), batch)

        def body(carry, xs):
            g_acc, s_acc = carry
            mb, i = xs
            (_, sums), g = grad_fn(adapters, base, mb, jax.random.fold_in(rng, i))
            return (jax.tree.map(jnp.add, g_acc, g), jax.tree.map(jnp.add, s_acc, sums)), None

        init = (jax.tree.map(jnp.zeros_like, adapters),
                {k: jnp.zeros((), jnp.float32) for k in ("loss_sum", "z_loss_sum", "correct", "count")})
        (grads, sums), _ = jax.lax.scan(body, init, (micro, jnp.arange(a)))
        return grads, sums

    def _step_fn(self, state: TrainState, base: Any, batch: Batch) -> tuple[TrainState, dict]:
        rng = jax.random.fold_in(jax.random.key(self.seed), state.step)
        grads, sums = self._grads(state.params, base, batch, rng)
        count = jnp.maximum(sums["count"], 1.0)
        grads = jax.tree.map(lambda g: g / count, grads)
        loss = sums["loss_sum"] / count
        new_state, finite, grad_norm = guarded_update(self.tx, state, grads, loss)
        metrics = {"loss": loss, "grad_norm": grad_norm, "tokens": sums["count"], "accuracy": sums["correct"] / count,
                   "finite": finite, "skipped": new_state.skipped}
        if self.lr_fn is not None:
            metrics["lr"] = jnp.asarray(self.lr_fn(state.step), jnp.float32)
        return new_state, metrics

    def step(self, state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
        """One optimizer step of the adapters on a global batch `[B, S]`."""
        if self.base is None:
            raise RuntimeError("LoraTrainer.set_base(params) must be called before step()")
        with mesh_context(self.mesh):
            return self._step(state, self.base, batch)

    def eval_loss(self, adapters: Any, batch: Batch) -> dict:
        """Metric sums (`loss_sum/count/correct`) of base + adapters on `batch`, no dropout."""
        if not hasattr(self, "_eval"):
            self._eval = jax.jit(lambda ad, b, x: self._loss(ad, b, x, None)[1],
                                 in_shardings=(self.state_shardings.params, self.base_shardings,
                                               data_sharding(self.mesh)),
                                 out_shardings=replicated(self.mesh))
        with mesh_context(self.mesh):
            return self._eval(adapters, self.base, batch)

    def merged_params(self, adapters: Any) -> Any:
        """Plain full params `W + s·A@B` (int4 / int8 bases dequantized), sharded like the model's params."""
        if not hasattr(self, "_merge"):
            self._merge = jax.jit(lambda b, ad: apply_lora(b, ad, self.lora.alpha, self.lora.rank),
                                  out_shardings=self.full_shardings)
        with mesh_context(self.mesh):
            return self._merge(self.base, adapters)
