"""The SFT experiment: chat JSONL → packed grain batches → full / LoRA / QLoRA steps in `run_loop`,
then greedy exact-match on held-out prompts (`eval_exact_match`) and an optional HF export.

Starting points (`init_from`): an HF InternLM2 folder, a workdir / Orbax checkpoint dir of ours, or None
(fresh init, for the tiny demo). `task=` generates a toy chat task plus a tokenizer into `workdir/data`
instead of reading `data` / `eval_data`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
from typing import Any, Optional, Sequence

import flax.linen as nn
import gin
import jax
import numpy as np
import optax

from internlm2_jax.checkpointing import CheckpointConfig
from internlm2_jax.config import ModelConfig
from internlm2_jax.sft.data import SFTDataConfig, eval_batch, eval_prompts, make_train_iterator, num_rows
from internlm2_jax.sft.formats import Message, load_conversations, load_sft_examples, render_mask
from internlm2_jax.generate import generate
from internlm2_jax.sft.lora import LoraConfig
from internlm2_jax.sft.lora_trainer import LoraTrainer
from internlm2_jax.sharding import MeshConfig, host_local_to_global, make_mesh, validate
from internlm2_jax.tokenizer import Tokenizer
from internlm2_jax.train.metrics_log import MetricsLog
from internlm2_jax.train.optimizer import OptimizerConfig, lr_schedule, make_optimizer
from internlm2_jax.train.loop import LoopConfig, initial_state, run_stage
from internlm2_jax.train.causal_lm import LOG_KEYS, StepConfig, causal_lm_trainer
from internlm2_jax.train.trainer import mesh_context

log = logging.getLogger(__name__)
MODES = ("full", "lora", "qlora")
for _cls in (SFTDataConfig, LoraConfig):
    gin.external_configurable(_cls)

SFT_OPTIMIZER = OptimizerConfig(peak_lr=4e-5, end_lr_ratio=0.0, warmup_steps=0, b2=0.95, weight_decay=0.0)
"""The report's SFT recipe: AdamW, lr 4e-5, cosine (to 0 here), one epoch."""


def exact_match(config: ModelConfig, params: Any, tok: Tokenizer, conversations: Sequence[Sequence[Message]], *,
                max_new_tokens: int = 32, batch_size: int = 64) -> tuple[float, list[tuple[str, str]]]:
    """Fraction of conversations whose greedy answer (special tokens dropped, stripped) equals the last
    assistant turn; also returns `(generated, reference)` pairs."""
    prompts, answers = eval_prompts(tok, conversations)
    pairs = []
    for s in range(0, len(prompts), batch_size):
        outs = generate(config, params, prompts[s:s + batch_size], max_new_tokens=max_new_tokens,
                        stop_ids=tok.stop_ids, pad_id=tok.pad_id, vocab_limit=tok.vocab_size)
        pairs += [(tok.decode(o, skip_special=True).strip(), a.strip())
                  for o, a in zip(outs, answers[s:s + batch_size])]
    return float(np.mean([g == a for g, a in pairs])) if pairs else 0.0, pairs


def _resolve_inputs(workdir: str, task: Optional[str], data: Optional[str], eval_data: Optional[str],
                    tokenizer: Optional[str], init_from: Optional[str], task_sizes: tuple[int, int],
                    seed: int) -> tuple[str, Optional[str], str]:
    if task is not None:
        paths = _write_task(os.path.join(workdir, "data"), task, task_sizes, seed)
        data, eval_data, tokenizer = paths["train"], paths["eval"], tokenizer or paths["tokenizer"]
    if data is None:
        raise ValueError("sft_train needs `data` (a JSONL of conversations) or `task`")
    if tokenizer is None and init_from and os.path.exists(os.path.join(init_from, "tokenizer.model")):
        tokenizer = os.path.join(init_from, "tokenizer.model")
    if tokenizer is None:
        raise ValueError("sft_train needs `tokenizer` (a sentencepiece .model) or an init_from folder holding one")
    return data, eval_data, tokenizer


def _write_task(out_dir: str, task: str, sizes: tuple[int, int], seed: int) -> dict[str, str]:
    from internlm2_jax.sft.tasks import write_task

    return write_task(out_dir, task, sizes[0], sizes[1], seed=seed)


def _make_trainer(mode: str, model: ModelConfig, tx: optax.GradientTransformation, m: Any, step_config: StepConfig,
                  lr_fn: Any, lora: LoraConfig, seed: int, init_from: Optional[str]):
    if mode == "full":
        return causal_lm_trainer(model, tx, m, step_config, lr_fn=lr_fn)
    trainer = LoraTrainer(model, tx, m, lora, step_config, lr_fn=lr_fn, seed=seed,
                          quantize=f"int{lora.qlora_bits}" if mode == "qlora" else None)
    if init_from:
        from internlm2_jax.params_loading import load_policy

        base = load_policy(init_from, model, trainer.full_shardings)
    else:
        from internlm2_jax.model import init_params

        with mesh_context(m):
            base = jax.jit(lambda r: nn.meta.unbox(init_params(model, r)),
                           out_shardings=trainer.full_shardings)(jax.random.key(seed))
    trainer.set_base(base)
    return trainer


@gin.configurable(denylist=["workdir"])
def sft_train(
    workdir: str,
    model: ModelConfig = gin.REQUIRED,
    data: Optional[str] = None,
    eval_data: Optional[str] = None,
    task: Optional[str] = None,
    task_sizes: tuple[int, int] = (2000, 100),
    data_format: str = "auto",
    tokenizer: Optional[str] = None,
    data_config: SFTDataConfig = SFTDataConfig(),
    mode: str = "full",
    lora: LoraConfig = LoraConfig(),
    optimizer: OptimizerConfig = SFT_OPTIMIZER,
    warmup_ratio: Optional[float] = 0.03,
    epochs: float = 1.0,
    num_steps: Optional[int] = None,
    mesh: MeshConfig = MeshConfig(),
    step_config: StepConfig = StepConfig(),
    checkpoint: CheckpointConfig = CheckpointConfig(),
    init_from: Optional[str] = None,
    seed: int = 0,
    log_every: int = 10,
    eval_every: int = 0,
    checkpoint_every: int = 1000,
    eval_max_examples: int = 200,
    eval_max_new_tokens: int = 32,
    export_hf: bool = False,
    progress: bool = True,
    show_mask: int = 0,
    on_error: str = "raise",
) -> dict[str, Any]:
    """Fine-tunes `model` on chat data in `workdir` (resuming if it holds checkpoints); returns the last metrics.

    `mode`: "full" | "lora" | "qlora" (int4|8 base). `num_steps=None`: `epochs` passes over the packed rows;
    the lr schedule always spans the run (`optimizer.total_steps := num_steps`, warm-up `warmup_ratio` of it
    unless None). `eval_every > 0`: held-out loss during training. At the end: greedy exact match on up to
    `eval_max_examples` held-out conversations (`eval_exact_match`), and `workdir/hf` (+ tokenizer) when
    `export_hf` (LoRA merged first). `show_mask=N` only prints N training samples with `[[trained spans]]`.
    `on_error`: a bad line of `data` / `eval_data` stops the run with `path:line: ...` ("raise") or is left out
    and counted in the result's `skipped_records` ("skip"); no usable conversation is an `EmptyDatasetError`.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    os.makedirs(workdir, exist_ok=True)
    data, eval_data, tok_path = _resolve_inputs(workdir, task, data, eval_data, tokenizer, init_from, task_sizes, seed)
    tok = Tokenizer(tok_path)
    tok.check_compatible(model.vocab_size)
    examples, loaded = load_sft_examples(data, tok, data_format, on_error=on_error,
                                         last_turn_only=data_config.last_turn_only)
    if show_mask:
        for ids, mask in examples[:show_mask]:
            print(render_mask(tok, ids, mask, color=os.isatty(1)) + "\n" + "-" * 60)
        return {}
    held_load = load_conversations(eval_data, data_format, on_error=on_error) if eval_data else None
    held = held_load.conversations if held_load else []
    skipped = loaded.skipped + (held_load.skipped if held_load else 0)  # reported in the result
    if num_steps is None:
        num_steps = max(1, math.ceil(epochs * num_rows(examples, data_config) / data_config.global_batch_size))
    if warmup_ratio is not None:
        optimizer = dataclasses.replace(optimizer, warmup_steps=int(warmup_ratio * num_steps))
    optimizer = dataclasses.replace(optimizer, total_steps=num_steps)
    log.info("SFT %s: %d conversations (%d bad records skipped), %d steps", mode, len(examples), skipped, num_steps)

    m = make_mesh(mesh)
    validate(model, m, global_batch=data_config.global_batch_size, seq_len=data_config.seq_len)
    trainer = _make_trainer(mode, model, make_optimizer(optimizer), m, step_config, lr_schedule(optimizer), lora, seed,
                            init_from)
    train_it = make_train_iterator(examples, data_config, seed=seed, pad_id=tok.pad_id)

    evaluate = None
    if eval_every and held:
        held_examples = [tok.encode_chat_with_mask(c) for c in held]
        batch = eval_batch(held_examples, data_config.seq_len, data_config.global_batch_size, tok.pad_id)

        def evaluate(state: Any) -> dict:
            sums = jax.device_get(trainer.eval_loss(state.params, host_local_to_global(batch, m)))
            return {"eval_loss": float(sums["loss_sum"] / max(float(sums["count"]), 1.0)),
                    "eval_accuracy": float(sums["correct"] / max(float(sums["count"]), 1.0))}

    meta = {"mode": mode, "seed": seed, "num_steps": num_steps, "gin": gin.config_str()}
    loop_cfg = LoopConfig(num_steps=num_steps, log_every=log_every, eval_every=eval_every,
                          checkpoint_every=checkpoint_every, progress=progress, desc=f"sft-{mode}",
                          log_keys=LOG_KEYS, num_steps_name="sft_train.num_steps (or epochs)")
    init = lambda: (trainer.init_state(jax.random.key(seed)) if mode != "full"  # noqa: E731
                    else initial_state(trainer, init_from, seed))
    state, last, stopped = run_stage(workdir, trainer.abstract_state(), init, trainer.step_host, train_it, loop_cfg,
                                     checkpoint=checkpoint, evaluate=evaluate, meta=meta)
    if stopped:
        return {**last, "skipped_records": skipped}
    params = state.params if mode == "full" else trainer.merged_params(state.params)
    if held:
        em, pairs = exact_match(model, params, tok, held[:eval_max_examples], max_new_tokens=eval_max_new_tokens)
        log.info("eval_exact_match %.3f on %d held-out prompts; e.g. %s", em, len(pairs), pairs[:3])
        mlog = MetricsLog(workdir, resume_step=num_steps)
        mlog.write(num_steps, {"eval_exact_match": em})
        mlog.close()
        last = {**last, "eval_exact_match": em}
    if export_hf and jax.process_index() == 0:
        from internlm2_jax.hf_io import save_hf

        out = os.path.join(workdir, "hf")
        save_hf(model, jax.device_get(params), out)
        shutil.copy(tok.path, os.path.join(out, "tokenizer.model"))
    return {**last, "skipped_records": skipped}
