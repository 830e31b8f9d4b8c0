"""DPO: `python -m experiments.dpo --gin experiments/configs/rlhf/dpo_tiny.gin`.

Data: `toy:N` (generated a/b preference pairs under the `likes_a` rule, character tokenizer) or JSONL preference
files (`{prompt, chosen, rejected}`, see `internlm2_jax.rlhf.preference_data`) with a sentencepiece `tokenizer`.
`init_from`: the policy to start from (HF folder, Orbax workdir, msgpack; None: a fresh init for the toy), which is
also the frozen reference unless `reference` says otherwise. The reference's log-probs are computed once and kept
in `<workdir>/reference_logps.npz`; training runs in the one loop (checkpoints, exact resume, SIGTERM). Logs the
held-out implicit-reward margin and accuracy at step 0, every `eval_every` steps and at the end.
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
import numpy as np

from experiments.cli import entry_point, say
from internlm2_jax.checkpointing import CheckpointConfig
from internlm2_jax.config import ModelConfig
from internlm2_jax.params_loading import load_policy
from internlm2_jax.rlhf.dpo import DPOTask, cache_reference, encode_dpo_batch
from internlm2_jax.errors import ConfigValueError, EmptyDatasetError
from internlm2_jax.jsonl import JsonlRecords
from internlm2_jax.rlhf.preference_data import read_preference_pairs
from internlm2_jax.rlhf.prompts import load_tokenizer
from internlm2_jax.rlhf.toy_tasks import CharTokenizer, toy_preference_records
from internlm2_jax.sharding import MeshConfig, make_mesh
from internlm2_jax.train.optimizer import OptimizerConfig, make_optimizer
from internlm2_jax.train.loop import LoopConfig, run_stage
from internlm2_jax.train.trainer import Trainer, mesh_context

_FIELDS = ("chosen", "rejected", "chosen_mask", "rejected_mask", "ref_chosen", "ref_rejected")


def load_dpo_records(data: Sequence[str], tokenizer: Optional[str], seed: int,
                     on_error: str = "raise") -> tuple[JsonlRecords, Any]:
    """(records, tokenizer): `toy:N` → the `likes_a` half of `toy_preference_records(2N)`; else JSONL files, read
    by `read_preference_pairs` (`path:line:` errors or, with `on_error="skip"`, `records.skipped`; no usable pair
    is `EmptyDatasetError`)."""
    toy = [d for d in data if d.startswith("toy:")]
    if toy:
        files = [d for d in data if not d.startswith("toy:")]
        if files:  # two tokenizers cannot share one batch
            raise ConfigValueError(f"train_dpo.data mixes {toy} with files {files}: toy data uses its own character "
                                   "tokenizer; give either toy:N or JSONL files")
        bad = [d for d in toy if not d[4:].isdigit()]
        if bad:
            raise ConfigValueError(f"train_dpo.data: bad toy source {bad[0]!r}: expected toy:N with N a count")
        recs = [r for d in toy for r in toy_preference_records(2 * int(d[4:]), seed=seed)
                if r["condition"] == "likes_a"]
        return JsonlRecords(recs), CharTokenizer()
    if tokenizer is None:
        raise ConfigValueError("train_dpo.tokenizer=None: JSONL preference data needs a sentencepiece model path")
    if not data:
        raise EmptyDatasetError("train_dpo.data is empty: no preference files given")
    return read_preference_pairs(list(data), on_error), load_tokenizer(tokenizer)


def _cached_batches(path: str, make: Any) -> list[dict[str, np.ndarray]]:
    """The encoded batches with reference log-probs, from `path` if a previous (interrupted) run wrote it."""
    if os.path.exists(path):
        with np.load(path) as z:
            n = int(z["num_batches"])
            return [{k: z[f"{i}/{k}"] for k in _FIELDS} for i in range(n)]
    batches = make()
    if jax.process_index() == 0:
        tmp = f"{path}.tmp.npz"
        np.savez(tmp, num_batches=len(batches), **{f"{i}/{k}": b[k] for i, b in enumerate(batches) for k in _FIELDS})
        os.replace(tmp, path)
    return batches


@gin.configurable
def train_dpo(workdir: str, model: ModelConfig = gin.REQUIRED, data: Sequence[str] = ("toy:256",),
              tokenizer: Optional[str] = None, init_from: Optional[str] = None, reference: Optional[str] = None,
              beta: float = 0.1, label_smoothing: float = 0.0, seq_len: int = 64, batch_size: int = 16,
              epochs: int = 1, eval_fraction: float = 0.125, eval_every: int = 0, checkpoint_every: int = 100,
              optimizer: OptimizerConfig = OptimizerConfig(peak_lr=5e-7, warmup_steps=0, end_lr_ratio=0.0,
                                                          weight_decay=0.0),
              mesh: MeshConfig = MeshConfig(), checkpoint: CheckpointConfig = CheckpointConfig(), seed: int = 0,
              progress: bool = False, on_error: str = "raise") -> dict[str, Any]:
    """DPO for `epochs` over the training pairs in `workdir` (resuming if it holds checkpoints); returns the
    last logged metrics with the final held-out `eval_reward_margin` / `eval_reward_accuracy` and
    `skipped_records` (bad JSONL lines left out with `on_error="skip"`; `"raise"` stops at `path:line: ...`)."""
    os.makedirs(workdir, exist_ok=True)
    records, tok = load_dpo_records(list(data), tokenizer, seed, on_error)
    tok_pad = getattr(tok, "pad_id", 0)
    n_eval = max(int(len(records) * eval_fraction), batch_size)
    held_recs, train_recs = records[:n_eval], records[n_eval:]
    m = make_mesh(mesh)
    steps_per_epoch = len(train_recs) // batch_size
    if steps_per_epoch == 0:
        raise EmptyDatasetError(f"{', '.join(data)}: {len(records)} usable preference pairs ({records.skipped} "
                                f"skipped) leave {len(train_recs)} for training after {n_eval} held out: no batch "
                                f"of train_dpo.batch_size={batch_size}")
    tx = make_optimizer(dataclasses.replace(optimizer, total_steps=epochs * steps_per_epoch))
    trainer = Trainer(DPOTask(model, beta, label_smoothing), tx, m, seed=seed)

    def policy_from(path: Optional[str]) -> Any:
        if path:
            return load_policy(path, model, trainer.param_shardings)
        return trainer.init_state(jax.random.key(seed)).params

    def encode_all() -> list[dict[str, np.ndarray]]:
        ref = policy_from(reference or init_from)
        chunks = [train_recs[i * batch_size:(i + 1) * batch_size] for i in range(steps_per_epoch)]
        chunks += [held_recs[i:i + batch_size] for i in range(0, len(held_recs) - batch_size + 1, batch_size)]
        with mesh_context(m):
            return cache_reference(model, ref, [encode_dpo_batch(c, tok, seq_len, tok_pad) for c in chunks])

    batches = _cached_batches(os.path.join(workdir, "reference_logps.npz"), encode_all)
    train, held = batches[:steps_per_epoch], batches[steps_per_epoch:]
    def evaluate(state: Any) -> dict:  # the task's own loss metrics on the held-out batches, no gradients
        rows = [jax.device_get(trainer.eval_loss(state.params, b)) for b in held]
        return {"eval_reward_margin": float(np.mean([r["reward_margin"] for r in rows])),
                "eval_reward_accuracy": float(np.mean([r["reward_accuracy"] for r in rows])),
                "eval_dpo_loss": float(np.mean([r["dpo_loss"] for r in rows]))}

    num_steps = epochs * steps_per_epoch
    loop_cfg = LoopConfig(num_steps=num_steps, log_every=1, eval_every=eval_every or num_steps,
                          checkpoint_every=checkpoint_every, progress=progress, desc="dpo",
                          nonfinite_advice="Lower the lr or inspect the preference data", num_steps_name="epochs × batches")
    init = lambda: trainer.state_from_params(policy_from(init_from)) if init_from else trainer.init_state(  # noqa: E731
        jax.random.key(seed))
    state, last, stopped = run_stage(workdir, trainer.abstract_state(), init, trainer.step_host,
                                     iter(grain.MapDataset.source(train).repeat(epochs)), loop_cfg,
                                     checkpoint=checkpoint, evaluate=evaluate,
                                     meta={"kind": "dpo", "gin": gin.config_str()})
    return {**last, "steps": int(state.step), "stopped": stopped, "skipped_records": records.skipped}


@entry_point
def main(argv=None) -> int:
    from experiments.cli import parse_args

    args = parse_args(__doc__, default_gin="rlhf/dpo_tiny.gin", argv=argv)
    out = train_dpo(args.workdir)
    print(json.dumps({"workdir": args.workdir, **out}))
    if "eval_reward_accuracy" in out:
        say(f"DPO: held-out implicit-reward accuracy {out['eval_reward_accuracy']:.3f}, margin "
            f"{out['eval_reward_margin']:.3f}; {out.get('skipped_records', 0)} bad records skipped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
