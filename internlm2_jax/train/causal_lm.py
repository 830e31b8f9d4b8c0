"""The causal-LM task (pretraining, full SFT): next-token cross-entropy on `[B, S]` token batches.

`CausalLM` plugs into `internlm2_jax.train.trainer.Trainer`; `causal_lm_trainer` builds one the way
pretraining and SFT do. `loss_fn` / `loss_and_grads` are the same maths as plain functions.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import optax
from jax.sharding import Mesh

from internlm2_jax.config import ModelConfig
from internlm2_jax.model import InternLM2, init_params
from internlm2_jax.sharding import logical_to_sharding, validate
from internlm2_jax.train.loss import chunked_cross_entropy, next_token_targets
from internlm2_jax.train.trainer import Trainer
from internlm2_jax.train.update import Batch, accumulate_gradients

# Batch: tokens [B, S] and optional segment_ids / positions / loss_mask [B, S].
LOG_KEYS = ("loss", "accuracy", "grad_norm", "lr", "tokens")  # what pretraining / SFT write per log step


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Knobs of the train step that are not model or optimizer hyper-parameters."""

    grad_accum: int = 1
    """Micro-batches per step; the global batch is split into this many, gradients summed."""
    loss_chunk: int = 512
    """Positions per cross-entropy chunk (bounds the fp32 logits buffer to `[B, chunk, V]`)."""
    z_loss: float = 0.0
    """Weight of the z-loss `logsumexp²` (0 disables)."""


def loss_fn(config: ModelConfig, params: Any, batch: Batch, step_cfg: StepConfig) -> tuple[Any, dict]:
    """Sum of token losses (for accumulation) and the sums `loss_sum, z_loss_sum, correct, count` over `batch`."""
    hidden = InternLM2(config).apply({"params": params}, batch["tokens"], batch.get("positions"),
                                     batch.get("segment_ids"), head=False)
    targets, weights = next_token_targets(batch["tokens"], batch.get("loss_mask"), batch.get("segment_ids"))
    sums = chunked_cross_entropy(hidden, params["output"], targets, weights,
                                 chunk_size=step_cfg.loss_chunk, z_loss=step_cfg.z_loss)
    return sums["loss_sum"] + sums["z_loss_sum"], sums


def task_sums(sums: dict) -> dict:
    """`loss_fn`'s sums in the `update_step` convention: normalised by the token count."""
    return {"weight": sums["count"], "loss": sums["loss_sum"], "accuracy": sums["correct"],
            "z_loss": sums["z_loss_sum"]}


def loss_and_grads(config: ModelConfig, params: Any, batch: Batch, step_cfg: StepConfig):
    """Mean loss, mean gradients and metrics (`loss/accuracy/z_loss` per token, `weight` = token count),
    accumulating over `step_cfg.grad_accum` micro-batches."""
    task = CausalLM(config, step_cfg)
    _, grads, metrics = accumulate_gradients(task.loss, params, None, batch, None, step_cfg.grad_accum)
    return metrics["loss"], grads, metrics


@dataclasses.dataclass(frozen=True)
class CausalLM:
    """Next-token loss of the whole model (trainable = every param, nothing frozen)."""

    config: ModelConfig
    step_cfg: StepConfig = StepConfig()
    name: str = "causal_lm"
    weight_name: str = "tokens"

    @property
    def grad_accum(self) -> int:
        return self.step_cfg.grad_accum

    def loss(self, params: Any, frozen: Any, batch: Batch, rng: Optional[jax.Array]) -> tuple[Any, dict]:
        total, sums = loss_fn(self.config, params, batch, self.step_cfg)
        return total, task_sums(sums)

    def eval_sums(self, params: Any, frozen: Any, batch: Batch) -> dict:
        return loss_fn(self.config, params, batch, self.step_cfg)[1]

    def boxed_params(self, rng: jax.Array) -> Any:
        return init_params(self.config, rng)


def causal_lm_trainer(config: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh,
                      step_cfg: StepConfig = StepConfig(), lr_fn: Optional[Callable[[Any], Any]] = None) -> Trainer:
    """The pretraining / full-SFT trainer: `Trainer(CausalLM(config, step_cfg), tx, mesh, lr_fn=lr_fn)`."""
    validate(config, mesh)
    return Trainer(CausalLM(config, step_cfg), tx, mesh, lr_fn=lr_fn)


def model_param_shardings(config: ModelConfig, mesh: Mesh) -> Any:
    """`NamedSharding` tree of the model's params (plain `init_params` structure) on `mesh`."""
    validate(config, mesh)
    return logical_to_sharding(nn.get_partition_spec(jax.eval_shape(lambda: init_params(config, jax.random.key(0)))),
                               mesh)
