"""Conditional reward model: `python -m experiments.reward_model --gin experiments/configs/rlhf/rm_tiny.gin`.

Data: `toy:N` (generated pairs, character tokenizer) or JSONL preference files (see
`internlm2_jax.rlhf.preference_data`) with a sentencepiece tokenizer. `init_from`: an HF folder, an Orbax
pretraining / SFT workdir, or an RM (`.msgpack` / Orbax RM workdir). Params live on the `mesh` (default:
all devices over `data`). The run's Orbax checkpoints (`<workdir>/checkpoints/<step>`) are the RM (readable by
`experiments.ppo` as `reward = 'rm:<workdir>'`) and resume an interrupted run exactly; also writes
`rm_params.msgpack` and `metrics.jsonl` (loss, accuracy, per-condition held-out accuracy).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Any, Optional, Sequence

import gin
import grain
import jax

from experiments.cli import entry_point, say
from internlm2_jax.config import ModelConfig
from internlm2_jax.checkpointing import CheckpointConfig
from internlm2_jax.params_loading import load_reward, save_msgpack
from internlm2_jax.errors import ConfigValueError, EmptyDatasetError
from internlm2_jax.jsonl import JsonlRecords
from internlm2_jax.rlhf.preference_data import pack_pairs, read_preference_pairs, tokenize_pairs
from internlm2_jax.rlhf.prompts import default_reward_token_id, load_tokenizer
from internlm2_jax.rlhf.reward_model import DEFAULT_CONDITIONS
from internlm2_jax.rlhf.reward_task import RewardModelTask, evaluate
from internlm2_jax.rlhf.toy_tasks import TOY_CONDITIONS, CharTokenizer, toy_preference_records
from internlm2_jax.sharding import MeshConfig, make_mesh
from internlm2_jax.train.metrics_log import MetricsLog
from internlm2_jax.train.optimizer import OptimizerConfig, make_optimizer
from internlm2_jax.train.loop import LoopConfig, run_stage
from internlm2_jax.train.trainer import Trainer


def load_preferences(data: Sequence[str], tokenizer: Optional[str], conditions: Optional[dict],
                     on_error: str = "raise"):
    """(records, tokenizer, conditions, reward_token_id) for `toy:N` or JSONL paths; `records.skipped` counts
    the bad JSONL lines left out with `on_error="skip"` (`read_preference_pairs`: `path:line:` errors; no usable
    pair in the files is `EmptyDatasetError`, except as patches to `toy:N`, where an empty file only warns)."""
    toy = [d for d in data if d.startswith("toy:")]
    files = [d for d in data if not d.startswith("toy:")]
    if toy:  # generated pairs + any JSONL patches, all with the character tokenizer
        tok = CharTokenizer()
        conds = conditions or TOY_CONDITIONS
        # Patches may be empty (an online round that found nothing to fix): the toy pairs are the dataset.
        read = read_preference_pairs(files, on_error, conds, allow_empty=True)
        records = [r for t in toy for r in toy_preference_records(int(t[4:]))]
        return JsonlRecords(records + read, skipped=read.skipped, errors=read.errors), tok, conds, tok.reward_id
    if tokenizer is None:
        raise ConfigValueError("train_rm.tokenizer=None: JSONL preference data needs a sentencepiece model path")
    if not data:
        raise EmptyDatasetError("train_rm.data is empty: no preference files given")
    conds = conditions or DEFAULT_CONDITIONS
    records = read_preference_pairs(list(data), on_error, conds)
    tok = load_tokenizer(tokenizer)
    return records, tok, conds, default_reward_token_id(tok)


@gin.configurable
def train_rm(workdir: str, model: ModelConfig = gin.REQUIRED, data: Sequence[str] = ("toy:512",),
             tokenizer: Optional[str] = None, conditions: Optional[dict] = None, reward_token_id: Optional[int] = None,
             init_from: Optional[str] = None, optimizer: OptimizerConfig = OptimizerConfig(
                 peak_lr=1e-5, end_lr_ratio=0.5, warmup_steps=0, weight_decay=0.01),
             token_budget: int = 16384, row_len: int = 2048, max_pairs: int = 512, epochs: int = 1,
             gamma: float = 2.0, barrier_weight: float = 0.02, eval_fraction: float = 0.1,
             mesh: MeshConfig = MeshConfig(), seed: int = 0, max_nonfinite: int = 5, checkpoint_every: int = 100,
             checkpoint: CheckpointConfig = CheckpointConfig(), progress: bool = False,
             on_error: str = "raise") -> dict[str, Any]:
    """Trains the RM for `epochs` over token-budget batches in `workdir` (resuming if it holds checkpoints);
    returns the final held-out metrics.

    Runs in the one training loop: checkpoints (params, optimizer, position in the batches) every
    `checkpoint_every` steps and at the end, exact resume, SIGTERM save-and-stop; steps with a non-finite loss
    or gradient are skipped, `max_nonfinite` in a row stop the run. `reward_token_id` defaults to the
    tokenizer's (`internlm2_jax.rlhf.prompts.default_reward_token_id`). A bad JSONL line stops the run with
    `path:line: ...` (`on_error="raise"`) or is left out and counted in `skipped_records` (`"skip"`); fewer than
    two usable pairs (one to train on, one held out) is an `EmptyDatasetError`, never an untrained RM.
    """
    records, tok, conds, rid = load_preferences(list(data), tokenizer, conditions, on_error)
    rid = reward_token_id if reward_token_id is not None else rid
    names = sorted(conds)
    pairs, dropped = tokenize_pairs(records, tok, conds, rid, max_len=row_len // 2)
    if len(pairs) < 2:  # zero training steps would save an untrained RM and exit 0
        raise EmptyDatasetError(f"{', '.join(data)}: {len(pairs)} usable preference pairs, need at least 2 "
                                f"({records.skipped} bad records skipped, {dropped} longer than "
                                f"row_len // 2 = {row_len // 2} tokens dropped)")
    n_eval = max(int(len(pairs) * eval_fraction), 1)
    pack = dict(token_budget=token_budget, row_len=row_len, max_pairs=max_pairs, condition_names=names)
    train, held = list(pack_pairs(pairs[n_eval:], **pack)), list(pack_pairs(pairs[:n_eval], **pack))
    steps = epochs * len(train)
    tx = make_optimizer(dataclasses.replace(optimizer, total_steps=steps))
    trainer = Trainer(RewardModelTask(model, gamma, barrier_weight), tx, make_mesh(mesh), seed=seed)

    def init():
        if init_from:
            return trainer.state_from_params(load_reward(init_from, model, trainer.param_shardings))
        return trainer.init_state(jax.random.key(seed))

    batches = iter(grain.MapDataset.source(train).repeat(epochs))
    loop_cfg = LoopConfig(num_steps=steps, log_every=1, eval_every=0, checkpoint_every=checkpoint_every,
                          max_nonfinite=max_nonfinite, progress=progress, desc="reward-model",
                          nonfinite_advice="Lower the lr or inspect the preference data", num_steps_name="epochs × batches")
    meta = {"kind": "reward_model", "reward_token_id": int(rid), "gin": gin.config_str()}
    state, _, stopped = run_stage(workdir, trainer.abstract_state(), init, trainer.step_host, batches, loop_cfg,
                                  checkpoint=checkpoint, meta=meta)
    if stopped:
        return {"steps": int(state.step), "stopped": True}
    result = {"steps": steps, "pairs": len(pairs), "dropped": dropped, "skipped_records": records.skipped,
              **evaluate(model, state.params, held, names)}
    log = MetricsLog(workdir, resume_step=steps, tensorboard=False)
    log.write(steps, {f"eval/{k}": v for k, v in result.items()})
    log.close()
    if jax.process_index() == 0:
        save_msgpack(os.path.join(workdir, "rm_params.msgpack"), state.params)
    return result


@entry_point
def main(argv=None) -> int:
    from experiments.cli import parse_args

    args = parse_args(__doc__, default_gin="rlhf/rm_tiny.gin", argv=argv)
    out = train_rm(args.workdir)
    print(json.dumps({"workdir": args.workdir, **out}))
    if "accuracy" in out:
        per = ", ".join(f"{k[9:]} {v:.3f}" for k, v in sorted(out.items()) if k.startswith("accuracy/"))
        say(f"reward model: held-out pairwise accuracy {out['accuracy']:.3f}" + (f" ({per})" if per else "")
            + f", mean margin {out['margin']:.3f}; {out.get('skipped_records', 0)} bad records skipped")
        say(f"reward model in {args.workdir}/checkpoints (and rm_params.msgpack)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
