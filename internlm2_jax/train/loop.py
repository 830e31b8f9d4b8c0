"""The pretraining loop: data → sharded steps → logs, eval, checkpoints, preemption and NaN safety."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import signal
import time
from typing import Any, Optional

import gin
import jax
import numpy as np

from internlm2_jax.checkpointing import CheckpointConfig, Checkpointer, load_parameters_only
from internlm2_jax.config import ModelConfig
from internlm2_jax.input import InputConfig, make_pretrain_iterator
from internlm2_jax.sharding import MeshConfig, host_local_to_global, make_mesh, validate
from internlm2_jax.tokenizer import Tokenizer
from internlm2_jax.train.metrics_log import MetricsLog
from internlm2_jax.train.optimizer import OptimizerConfig, lr_schedule, make_optimizer
from internlm2_jax.train.step import StepConfig, Trainer

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Raised after too many consecutive non-finite steps."""


class _StopFlag:
    """Set by SIGTERM/SIGINT; the loop finishes the step, saves and exits cleanly."""

    def __init__(self) -> None:
        self.requested = False
        self._old = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not in the main thread
                pass

    def _handle(self, signum, frame) -> None:
        log.warning("received signal %d: finishing this step, saving and exiting", signum)
        self.requested = True

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def resolve_tokenizer(path: str, input_cfg: InputConfig, vocab_size: int) -> Tokenizer:
    """`path` to a `.model`, or `"stdlib"`: train (once, cached) on the embedded stdlib corpus."""
    if path == "stdlib":
        from internlm2_jax.input.stdlib_corpus import build_stdlib_corpus, ensure_tokenizer

        uri = next((u for u in input_cfg.sources.values() if u.startswith("stdlib:")), "stdlib:")
        path = ensure_tokenizer(build_stdlib_corpus(uri[len("stdlib:"):] or None), vocab_size=vocab_size)
    tok = Tokenizer(path)
    tok.check_compatible(vocab_size)
    return tok


def _initial_state(trainer: Trainer, init_from: Optional[str], seed: int):
    """Fresh params, or warm start from an HF folder / our Orbax checkpoint (params only)."""
    if init_from is None:
        return trainer.init_state(jax.random.key(seed))
    if os.path.exists(os.path.join(init_from, "config.json")):
        from internlm2_jax.hf_io import load_hf

        cfg, params = load_hf(init_from)
        mismatch = {f.name for f in dataclasses.fields(cfg) if f.name not in ("dtype", "param_dtype", "scan_layers",
                    "remat_policy", "attention_impl", "rope_theta", "rope_scaling", "max_position_embeddings")
                    and getattr(cfg, f.name) != getattr(trainer.config, f.name)}
        if mismatch:
            raise ValueError(f"init_from={init_from}: HF config differs from the model config in {sorted(mismatch)}")
        return trainer.state_from_params(params)
    ckpt_dir = os.path.join(init_from, "checkpoints") if os.path.isdir(os.path.join(init_from, "checkpoints")) \
        else init_from
    params = load_parameters_only(ckpt_dir, trainer.abstract_state().params)
    return trainer.state_from_params(params)


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
    trainer = Trainer(model, make_optimizer(optimizer), m, step_config, lr_fn=lr_schedule(optimizer))
    train_it = make_pretrain_iterator(input, tokenizer=tok, split="train")
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), checkpoint)

    restored = ckpt.restore(trainer.abstract_state(), data_iter=train_it)
    if restored is not None:
        start, state, _ = restored
        log.info("resumed from step %d in %s", start, workdir)
    else:
        start, state = 0, _initial_state(trainer, init_from, seed)
    metrics_log = MetricsLog(workdir, resume_step=start)
    meta = {"model": {k: str(v) for k, v in dataclasses.asdict(model).items()}, "seed": seed,
            "gin": gin.config_str()}
    stop = _StopFlag()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=num_steps, initial=start, dynamic_ncols=True, desc="pretrain")
    if start == 0 and eval_every:
        metrics_log.write(0, _evaluate(trainer, state.params, input, tok, m, eval_batches))
    ema, last, t0, tokens_seen = None, {}, time.perf_counter(), 0.0
    try:
        for step in range(start, num_steps):
            batch = host_local_to_global(next(train_it), m)
            state, metrics = trainer.step(state, batch)
            metrics = jax.device_get(metrics)  # blocks: one step in flight at a time
            tokens_seen += float(metrics["tokens"])
            done = step + 1
            if not metrics["finite"]:
                log.warning("step %d: non-finite loss or gradient; update skipped (%d in a row)",
                            done, int(metrics["skipped"]))
                if int(metrics["skipped"]) >= max_nonfinite:
                    raise NonFiniteLossError(
                        f"{max_nonfinite} consecutive non-finite steps (last at step {done}); stopping. The last "
                        f"checkpoint holds finite params; lower the lr or inspect the data near this step")
            else:
                loss = float(metrics["loss"])
                if ema is not None and loss > spike_factor * ema:
                    log.warning("step %d: loss spike %.4f (running mean %.4f)", done, loss, ema)
                ema = loss if ema is None else 0.98 * ema + 0.02 * loss
            if done % log_every == 0 or done == num_steps:
                dt = time.perf_counter() - t0
                last = {k: float(metrics[k]) for k in ("loss", "accuracy", "grad_norm", "lr", "tokens")}
                last.update(tokens_per_s=tokens_seen / max(dt, 1e-9), skipped=int(metrics["skipped"]))
                if eval_every and (done % eval_every == 0 or done == num_steps):
                    last.update(_evaluate(trainer, state.params, input, tok, m, eval_batches))
                metrics_log.write(done, last)
                t0, tokens_seen = time.perf_counter(), 0.0
            elif eval_every and done % eval_every == 0:
                metrics_log.write(done, _evaluate(trainer, state.params, input, tok, m, eval_batches))
            if bar is not None:
                bar.update(1)
                if last:
                    bar.set_postfix(loss=f"{last['loss']:.3f}", tok_s=f"{last['tokens_per_s']:.0f}")
            if done % checkpoint_every == 0 or done == num_steps or stop.requested:
                ckpt.save(done, state, train_it, meta, force=True)
            if stop.requested:
                ckpt.wait()
                log.warning("stopped by signal after step %d; checkpoint saved", done)
                break
    finally:
        ckpt.close()
        metrics_log.close()
        stop.restore()
        if bar is not None:
            bar.close()
    if export_hf and not stop.requested:
        from internlm2_jax.hf_io import save_hf

        save_hf(model, jax.device_get(state.params), os.path.join(workdir, "hf"))
    return last
