"""The pretraining loop: data → sharded steps → logs, eval, checkpoints, preemption and NaN safety."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from typing import Any, Optional

import gin
import jax

from internlm2_jax.checkpointing import CheckpointConfig
from internlm2_jax.config import ModelConfig
from internlm2_jax.input import InputConfig, make_pretrain_iterator
from internlm2_jax.input.pipeline import skipped_records
from internlm2_jax.sharding import MeshConfig, host_local_to_global, make_mesh, validate
from internlm2_jax.tokenizer import Tokenizer
from internlm2_jax.train.optimizer import OptimizerConfig, lr_schedule, make_optimizer
from internlm2_jax.train.loop import (  # noqa: F401  (NonFiniteLossError re-exported)
    LoopConfig, NonFiniteLossError, initial_state, run_stage)
from internlm2_jax.train.causal_lm import LOG_KEYS, StepConfig, causal_lm_trainer
from internlm2_jax.train.trainer import Trainer

log = logging.getLogger(__name__)


def resolve_tokenizer(path: str, input_cfg: InputConfig, vocab_size: int) -> Tokenizer:
    """`path` to a `.model`, or `"stdlib"`: train (once, cached) on the embedded stdlib corpus."""
    if path == "stdlib":
        from internlm2_jax.input.stdlib_corpus import build_stdlib_corpus, ensure_tokenizer

        uri = next((u for u in input_cfg.sources.values() if u.startswith("stdlib:")), "stdlib:")
        path = ensure_tokenizer(build_stdlib_corpus(uri[len("stdlib:"):] or None), vocab_size=vocab_size)
    tok = Tokenizer(path)
    tok.check_compatible(vocab_size)
    return tok


def _evaluate(trainer: Trainer, params, input_cfg: InputConfig, tok: Tokenizer, mesh, num_batches: int) -> dict:
    it = make_pretrain_iterator(input_cfg, tokenizer=tok, split="validation")
    loss_sum, count, correct = 0.0, 0.0, 0.0
    for _ in range(num_batches):
        try:
            batch = next(it)
        except StopIteration:
            break
        sums = jax.device_get(trainer.eval_loss(params, host_local_to_global(batch, mesh)))
        loss_sum, count, correct = loss_sum + sums["loss_sum"], count + sums["count"], correct + sums["correct"]
    mean = loss_sum / max(count, 1.0)
    return {"eval_loss": float(mean), "eval_ppl": math.exp(min(float(mean), 50.0)),
            "eval_accuracy": float(correct / max(count, 1.0))}


@gin.configurable(denylist=["workdir"])
def train(
    workdir: str,
    model: ModelConfig = gin.REQUIRED,
    input: InputConfig = gin.REQUIRED,  # noqa: A002 - gin binding name
    num_steps: int = gin.REQUIRED,
    optimizer: OptimizerConfig = OptimizerConfig(),
    mesh: MeshConfig = MeshConfig(),
    step_config: StepConfig = StepConfig(),
    checkpoint: CheckpointConfig = CheckpointConfig(),
    tokenizer: str = "stdlib",
    checkpoint_every: int = 1000,
    eval_every: int = 1000,
    eval_batches: int = 8,
    log_every: int = 10,
    seed: int = 0,
    init_from: Optional[str] = None,
    max_nonfinite: int = 5,
    spike_factor: float = 2.0,
    export_hf: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Pretrains `model` on `input` for `num_steps` steps in `workdir` (resuming if it holds checkpoints).

    `init_from`: HF folder or a previous stage's workdir/checkpoints — params only, fresh optimizer
    and step 0 (a new LR schedule); to continue a schedule, reuse the previous workdir instead.
    Returns the last logged metrics.
    """
    os.makedirs(workdir, exist_ok=True)
    m = make_mesh(mesh)
    validate(model, m, global_batch=input.global_batch_size, seq_len=input.seq_len)
    tok = resolve_tokenizer(tokenizer, input, model.vocab_size)
    trainer = causal_lm_trainer(model, make_optimizer(optimizer), m, step_config, lr_fn=lr_schedule(optimizer))
    train_it = make_pretrain_iterator(input, tokenizer=tok, split="train")
    meta = {"model": {k: str(v) for k, v in dataclasses.asdict(model).items()}, "seed": seed,
            "gin": gin.config_str()}
    loop_cfg = LoopConfig(num_steps=num_steps, log_every=log_every, eval_every=eval_every,
                          checkpoint_every=checkpoint_every, max_nonfinite=max_nonfinite,
                          spike_factor=spike_factor, progress=progress, desc="pretrain", log_keys=LOG_KEYS,
                          num_steps_name="train.num_steps")
    state, last, stopped = run_stage(
        workdir, trainer.abstract_state(), lambda: initial_state(trainer, init_from, seed), trainer.step_host,
        train_it, loop_cfg, checkpoint=checkpoint, meta=meta,
        evaluate=lambda st: _evaluate(trainer, st.params, input, tok, m, eval_batches))
    if export_hf and not stopped:
        from internlm2_jax.hf_io import save_hf

        save_hf(model, jax.device_get(state.params), os.path.join(workdir, "hf"))
    return {**last, "skipped_records": skipped_records(train_it)}
