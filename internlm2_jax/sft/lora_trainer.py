"""LoRA / QLoRA as a task of the one `Trainer`: trainable = the adapters, frozen = the (quantized) base.

The state's `params` are the adapters only (`{"a": [*lead, in, r], "b": [*lead, r, *out]}` per target, see
`lora.py`), so the loop checkpoints adapters + optimizer state and nothing of the frozen base. The base
(plain, or int4 `Int4Weight` / int8 `QuantizedWeight` for QLoRA, see `quantize.py`) is the trainer's frozen
part, sharded by the model's logical rules, and is passed to the jitted step as a non-donated input
(dequantized inside the loss). Adapter shardings follow their base weight:

    A [*lead, in, r]   logical (*lead_axes, first in-axis, None)
    B [*lead, r, *out] logical (*lead_axes, None, *out_axes)

e.g. wqkv `(layers, embed, kv_heads, qkv_group, head_dim)` → A `(layers, embed, None)`,
B `(layers, None, kv_heads, qkv_group, head_dim)`; A's flattened `in` dim is split like its first factor.
Quantized bases: int8 q keeps the weight's axes, its scale None on the in dims; int4's packed q keeps the
weight's axes (packed dim halved), its block scales None on the packed dim.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import optax
from jax.sharding import Mesh, PartitionSpec as P

from internlm2_jax.config import ModelConfig
from internlm2_jax.model import abstract_params
from internlm2_jax.sft.lora import LoraConfig, apply_lora, init_lora
from internlm2_jax.sft.quantize import IN_NDIM, OUT_NDIM, Int4Weight, QuantizedWeight, int4_axis, quantize_base
from internlm2_jax.sharding import logical_to_sharding, validate
from internlm2_jax.train.causal_lm import StepConfig, loss_fn, task_sums
from internlm2_jax.train.trainer import Trainer, mesh_context
from internlm2_jax.train.update import Batch, TrainState, update_step


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


@dataclasses.dataclass(frozen=True)
class LoraTask:
    """Causal-LM loss of `base + s·A@B` (LoRA dropout from the step rng), differentiated in the adapters only."""

    config: ModelConfig
    lora: LoraConfig
    step_cfg: StepConfig = StepConfig()
    quantize: Optional[str] = None
    name: str = "lora"
    weight_name: str = "tokens"

    @property
    def grad_accum(self) -> int:
        return self.step_cfg.grad_accum

    @property
    def bits(self) -> Optional[int]:
        return {None: None, "int4": 4, "int8": 8}[self.quantize]

    def _merged(self, adapters: Any, base: Any, rng: Optional[jax.Array]) -> Any:
        return apply_lora(base, adapters, self.lora.alpha, self.lora.rank, dropout=self.lora.dropout, rng=rng)

    def loss(self, adapters: Any, base: Any, batch: Batch, rng: Optional[jax.Array]) -> tuple[Any, dict]:
        total, sums = loss_fn(self.config, self._merged(adapters, base, rng), batch, self.step_cfg)
        return total, task_sums(sums)

    def eval_sums(self, adapters: Any, base: Any, batch: Batch) -> dict:
        return loss_fn(self.config, self._merged(adapters, base, None), batch, self.step_cfg)[1]

    def boxed_params(self, rng: jax.Array) -> Any:
        abstract = abstract_params(self.config)
        specs = adapter_logical_axes(nn.get_partition_spec(abstract), self.lora.targets)
        ads = init_lora(nn.meta.unbox(abstract), self.lora, rng)
        return jax.tree.map(lambda x, s: nn.LogicallyPartitioned(x, tuple(s)), ads, specs,
                            is_leaf=lambda x: isinstance(x, P))

    def full_shardings(self, mesh: Mesh) -> Any:
        return logical_to_sharding(nn.get_partition_spec(abstract_params(self.config)), mesh)

    def frozen_shardings(self, mesh: Mesh) -> Any:
        specs = nn.get_partition_spec(abstract_params(self.config))
        if self.bits is None:
            return logical_to_sharding(specs, mesh)
        return logical_to_sharding(quantized_logical_axes(specs, self.lora.targets, self.bits), mesh)


class LoraTrainer(Trainer):
    """`Trainer` on a `LoraTask`, plus the base's placement (`set_base`) and the merged export (`merged_params`).

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
        super().__init__(LoraTask(config, lora, step_cfg, quantize), tx, mesh, lr_fn=lr_fn, seed=seed)
        self.config, self.lora = config, lora
        self.full_shardings = self.task.full_shardings(mesh)

    def set_base(self, params: Any) -> None:
        """Places the frozen base on the mesh (quantizing its target weights for QLoRA)."""
        params = jax.tree.map(jax.device_put, nn.meta.unbox(params), self.full_shardings)
        bits = self.task.bits
        if bits is not None:
            quant = lambda p: quantize_base(p, self.lora.targets, bits, self.lora.qlora_block)  # noqa: E731
            with mesh_context(self.mesh):
                params = jax.jit(quant, out_shardings=self.frozen_shardings)(params)
        self.set_frozen(params)

    @property
    def base(self) -> Any:
        return self.frozen

    def step(self, state: Any, batch: Batch) -> tuple[Any, dict]:
        """One optimizer step of the adapters on a global batch `[B, S]`."""
        if self.frozen is None:
            raise RuntimeError("LoraTrainer.set_base(params) must be called before step()")
        return super().step(state, batch)

    def merged_params(self, adapters: Any) -> Any:
        """Plain full params `W + s·A@B` (int4 / int8 bases dequantized), sharded like the model's params."""
        if not hasattr(self, "_merge"):
            self._merge = jax.jit(lambda b, ad: apply_lora(b, ad, self.lora.alpha, self.lora.rank),
                                  out_shardings=self.full_shardings)
        with mesh_context(self.mesh):
            return self._merge(self.frozen, adapters)


def make_lora_step(config: ModelConfig, tx: optax.GradientTransformation, cfg: LoraConfig,
                   step_cfg: StepConfig = StepConfig()) -> Callable:
    """Jitted `step(adapters, opt_state, base, batch, rng) -> (adapters, opt_state, metrics)` without a mesh:
    the `LoraTask` step of `update_step` on plain trees (`opt_state = tx.init(adapters)`); the base — plain,
    int8 or int4 — is never touched. `batch` follows the train step's layout (`tokens/... [B, S]`)."""
    task = LoraTask(config, cfg, step_cfg)

    @jax.jit
    def step(adapters, opt_state, base, batch, rng):
        state = TrainState(step=jax.numpy.zeros((), jax.numpy.int32), params=adapters, opt_state=opt_state,
                           skipped=jax.numpy.zeros((), jax.numpy.int32))
        new, m = update_step(task.loss, tx, state, base, batch, rng, grad_accum=task.grad_accum)
        return new.params, new.opt_state, {"loss": m["loss"], "tokens": m["weight"], "grad_norm": m["grad_norm"],
                                           "finite": m["finite"]}

    return step
