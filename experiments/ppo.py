"""PPO / GRPO / RLOO: `python -m experiments.ppo --gin experiments/configs/rlhf/ppo_tiny.gin`.

Data: toy arithmetic prompts with the character tokenizer (default), or prompt JSONL files (`prompts`,
records `{"prompt"|"messages", "category"}`) with a sentencepiece `tokenizer`. `actor_init`: an HF folder,
an Orbax pretraining / SFT workdir, or `.msgpack`; `reward = 'rm:<path>'` takes an RM workdir (Orbax, from
`experiments.reward_model`) or `rm_params.msgpack`. All models live on the `mesh`.

Prints and logs (metrics.jsonl) per iteration: reward, KL, entropy, value loss, clip fraction, response
length, ptx loss, rollout and training tokens/s and the generation / scoring / training time breakdown. The
run's Orbax checkpoints (`<workdir>/checkpoints/<iteration>`: actor, critic, optimizer states, rng, data positions)
resume it exactly and are read by `load_policy` / `load_reward` as the actor / critic. At the end, fresh rollouts
go to `rollouts.jsonl` for the online fast-path scan (`experiments.online_rlhf`) and the actor to
`actor_params.msgpack`.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from typing import Any, Optional, Sequence

import gin
import grain
import jax
import numpy as np

from experiments.cli import entry_point, say
from internlm2_jax.checkpointing import CheckpointConfig
from internlm2_jax.config import ModelConfig
from internlm2_jax.errors import EmptyDatasetError
from internlm2_jax.input import InputConfig, make_pretrain_iterator
from internlm2_jax.params_loading import load_policy, load_reward, save_msgpack
from internlm2_jax.rlhf.algorithms import samples_per_prompt
from internlm2_jax.rlhf.mesh import actor_shardings, critic_shardings
from internlm2_jax.rlhf.online import write_jsonl
from internlm2_jax.rlhf.rl_trainer import RLConfig, RLTrainer
from internlm2_jax.rlhf.prompts import default_reward_token_id, load_tokenizer, read_prompts, turn_end_ids
from internlm2_jax.rlhf.reward_model import DEFAULT_CONDITIONS, init_policy, init_reward_params
from internlm2_jax.rlhf.rollout import RewardModelScorer, make_prompt_items
from internlm2_jax.rlhf.toy_tasks import TOY_CONDITIONS, target_token_reward, toy_pretrain_batches, toy_prompts
from internlm2_jax.sharding import MeshConfig, make_mesh
from internlm2_jax.train.metrics_log import read_metrics
from internlm2_jax.train.optimizer import OptimizerConfig, make_optimizer
from internlm2_jax.train.loop import LoopConfig, run_stage

gin.external_configurable(RLConfig)


@functools.lru_cache(maxsize=8)
def _opt(lr: float):
    """One optimizer object per lr, so runs in one process share their compiled steps."""
    return make_optimizer(OptimizerConfig(peak_lr=lr, warmup_steps=0, schedule="constant", weight_decay=0.0))


def _print_iteration(m: dict) -> None:
    nan = float("nan")
    print(f"iter {m['iteration']:3d} reward {m['reward']:.3f} kl {m['kl']:.3f} entropy {m.get('entropy', nan):.3f} "
          f"vloss {m.get('value_loss', nan):.4f} clip {m.get('clip_frac', nan):.3f} "
          f"ptx {m.get('pretrain_loss', nan):.3f} len {m['response_length']:.1f} | "
          f"gen {m['time/generation']:.3f}s score {m['time/scoring']:.3f}s train {m['time/training']:.3f}s | "
          f"rollout {m['rollout_tokens_per_s']:.0f} tok/s train {m['train_tokens_per_s']:.0f} tok/s", flush=True)


@gin.configurable
def train_ppo(workdir: str, model: ModelConfig = gin.REQUIRED, ppo: RLConfig = RLConfig(),
              iterations: int = 40, actor_lr: float = 1e-6, critic_lr: float = 5e-6, reward: str = "target:a",
              actor_init: Optional[str] = None, num_prompts: int = 256, pretrain_batch: int = 4,
              pretrain_data: Optional[InputConfig] = None, prompts: Optional[Sequence[str]] = None,
              tokenizer: Optional[str] = None, reward_token_id: Optional[int] = None,
              conditions: Optional[dict] = None, mesh: MeshConfig = MeshConfig(), seed: int = 0,
              checkpoint_every: int = 10, checkpoint: CheckpointConfig = CheckpointConfig(),
              on_error: str = "raise") -> dict[str, Any]:
    """Runs `iterations` RL iterations (`ppo.algo`: ppo, grpo, rloo, ...) in `workdir`, resuming if it holds
    checkpoints (actor, critic, optimizer states, rollout rng, prompt and pretraining data positions).

    reward: `target:<text>` (fraction of response tokens equal to the first token of `<text>`) or
    `rm:<path>` (the conditional RM, fed each prompt's category as its system prompt; it scores
    `prefix + response + <|im_end|>\\n + reward token` like its training data). The critic starts from the RM
    when given one, else from the actor's backbone with a zero head, and reads the RM's input layout. ptx data:
    `pretrain_data` (an `InputConfig` of the pretraining pipeline, e.g. the pretraining corpus) on the real path,
    generated 'a+b=c' chats (`pretrain_batch` rows) on the toy one. `tokenizer`: `None`/`'char'` (toy) or a
    sentencepiece model; `reward_token_id` defaults to the tokenizer's (`default_reward_token_id`). A bad line
    in `prompts` stops the run with `path:line: ...` (`on_error="raise"`) or is left out and counted in
    `skipped_records` (`"skip"`); an empty prompt file is an `EmptyDatasetError`.
    """
    tok = load_tokenizer(tokenizer)
    skipped = 0
    if prompts:  # read first: a bad prompt file fails in a second, not after loading the actor
        conds = conditions or DEFAULT_CONDITIONS
        records = read_prompts(list(prompts), on_error, conds)
        skipped = records.skipped
    else:
        records, conds = toy_prompts(num_prompts, tok, seed), conditions or TOY_CONDITIONS
    items = [it for it in make_prompt_items(records, tok, conds) if len(it["tokens"]) <= ppo.max_prompt_len]
    if len(items) < ppo.batch_size:  # too few prompts for one rollout batch: a data error, not a crash later
        raise EmptyDatasetError(f"only {len(items)} of {len(records)} prompts ({skipped} bad records skipped) fit "
                                f"max_prompt_len={ppo.max_prompt_len}; need ppo.batch_size={ppo.batch_size}")
    dev_mesh = make_mesh(mesh)
    a_sh = actor_shardings(model, dev_mesh)
    actor = load_policy(actor_init, model, a_sh) if actor_init else init_policy(model, jax.random.key(seed))
    rid = default_reward_token_id(tok) if reward_token_id is None else int(reward_token_id)
    if reward.startswith("rm:"):
        critic = load_reward(reward[3:], model, critic_shardings(model, dev_mesh))
        reward_fn = RewardModelScorer(model, critic, rid, pad_id=tok.pad_id, end_ids=turn_end_ids(tok),
                                      strip_ids=tok.stop_ids, mesh=dev_mesh)
    elif reward.startswith("target:"):
        target = tok.encode(reward[7:])[0]
        reward_fn = lambda items, responses: target_token_reward(responses, target)  # noqa: E731
        critic = init_reward_params(model, jax.random.key(seed + 1), backbone=actor)
    else:
        raise ValueError(f"unknown reward {reward!r}; expected 'target:<text>' or 'rm:<path>'")
    if pretrain_data is not None:
        pt = make_pretrain_iterator(pretrain_data, tokenizer=tok, split="train")
    elif tokenizer in (None, "char"):
        pt = toy_pretrain_batches(tok, pretrain_batch, ppo.max_prompt_len + ppo.max_new_tokens, seed)
    else:
        pt = None
    if pt is None and ppo.ptx_coef > 0:
        raise ValueError("ptx_coef > 0 on the real-data path needs train_ppo.pretrain_data (an InputConfig)")
    trainer = RLTrainer(model, ppo, actor, critic, reward_fn, _opt(actor_lr), _opt(critic_lr),
                        stop_ids=tok.stop_ids, pad_id=tok.pad_id, pretrain_iter=pt, seed=seed, mesh=dev_mesh)
    prompt_it = iter(grain.MapDataset.range(len(items)).shuffle(seed=seed).repeat().batch(ppo.batch_size))
    step = trainer.loop_step(items)

    def step_and_print(state: Any, indices: Any) -> tuple[Any, dict]:
        state, m = step(state, indices)
        _print_iteration(m)
        return state, m

    loop_cfg = LoopConfig(num_steps=iterations, log_every=1, eval_every=0, checkpoint_every=checkpoint_every,
                          progress=False, desc=ppo.algo,
                          nonfinite_advice="The last checkpoint holds finite params; lower the lrs",
                          num_steps_name="train_ppo.iterations")
    initial = trainer.state
    state, last, stopped = run_stage(workdir, trainer.abstract_state(), lambda: initial, step_and_print, prompt_it,
                                     loop_cfg, checkpoint=checkpoint, extra_iters={"ptx": pt} if pt else None,
                                     meta={"kind": ppo.algo, "gin": gin.config_str()})
    if stopped:
        return {"stopped": True, "iterations": int(state.iteration)}
    last = last or read_metrics(workdir)[-1]  # a finished run resumed: nothing left to do
    trainer.state = state
    batch_items = [items[i] for i in range(ppo.batch_size)]
    batch, responses, _ = trainer.rollout(batch_items)  # fresh rollouts for the online scan
    scores = np.asarray(batch["scores"])
    per = samples_per_prompt(trainer.algo, ppo.group_size)
    if jax.process_index() == 0:
        write_jsonl(os.path.join(workdir, "rollouts.jsonl"), [
            {"messages": batch_items[i // per]["messages"], "category": batch_items[i // per]["category"],
             "response": tok.decode([t for t in r if t not in tok.stop_ids]), "reward": float(scores[i])}
            for i, r in enumerate(responses)])
        save_msgpack(os.path.join(workdir, "actor_params.msgpack"), state.actor)
    return {"final_reward": last["reward"], "final_kl": last["kl"], "iterations": iterations,
            "skipped_records": skipped}


@entry_point
def main(argv=None) -> int:
    from experiments.cli import parse_args

    args = parse_args(__doc__, default_gin="rlhf/ppo_tiny.gin", argv=argv)
    t0 = time.time()
    out = train_ppo(args.workdir)
    print(json.dumps({"workdir": args.workdir, **out, "wall_s": round(time.time() - t0, 1)}))
    if "final_reward" in out:
        say(f"final reward {out['final_reward']:.3f}, KL {out['final_kl']:.4f}; actor in {args.workdir}/checkpoints "
            "(and actor_params.msgpack), fresh rollouts in rollouts.jsonl")
    return 0


if __name__ == "__main__":
    sys.exit(main())
