"""One PPO iteration (rollout, critic + actor updates with ptx) on 2 processes × 2 CPU devices over loopback, or
the single-process reference on 4 devices; the mesh (`data=4`) is the same in both.

    python two_process_ppo.py PORT PROCESS_ID      # process PROCESS_ID of 2
    python two_process_ppo.py 0 single             # 1 process, 4 CPU devices

Prints `METRICS {json}`. Each process feeds only its half of every pretraining (ptx) batch.
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"
port, who = sys.argv[1], sys.argv[2]
if who == "single":
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"

import jax  # noqa: E402

from internlm2_jax import distributed  # noqa: E402
from internlm2_jax.config import get_preset  # noqa: E402
from internlm2_jax.rlhf.reward_model import init_policy, init_reward_params  # noqa: E402
from internlm2_jax.rlhf.rl_trainer import RLConfig, RLTrainer  # noqa: E402
from internlm2_jax.rlhf.rollout import make_prompt_items  # noqa: E402
from internlm2_jax.rlhf.toy_tasks import (TOY_CONDITIONS, CharTokenizer, target_token_reward,  # noqa: E402
                                          toy_pretrain_batches, toy_prompts)
from internlm2_jax.sharding import MeshConfig, make_mesh  # noqa: E402
from internlm2_jax.train.optimizer import OptimizerConfig, make_optimizer  # noqa: E402

if who != "single":
    distributed.initialize(f"127.0.0.1:{port}", 2, int(who), timeout_s=60)
    assert jax.process_count() == 2 and jax.device_count() == 4

TOK = CharTokenizer()
cfg = get_preset("tiny", dtype="float32", vocab_size=TOK.vocab_size, num_hidden_layers=1)
mesh = make_mesh(MeshConfig(data=-1))
actor = init_policy(cfg, jax.random.key(0))
critic = init_reward_params(cfg, jax.random.key(1), backbone=actor)
rows = distributed.local_batch_slice(4)
ptx = ({k: v[rows] for k, v in b.items()} for b in toy_pretrain_batches(TOK, 4, 40))
tx = make_optimizer(OptimizerConfig(peak_lr=3e-3, warmup_steps=0, schedule="constant", weight_decay=0.0))
target = TOK.encode("a")[0]
rl = RLConfig(batch_size=8, max_prompt_len=32, max_new_tokens=8, critic_warmup_iters=0, ppo_epochs=2,
              num_minibatches=2, ptx_coef=0.5, logprob_chunk=8)
tr = RLTrainer(cfg, rl, actor, critic, lambda items, r: target_token_reward(r, target), tx, tx,
               stop_ids=TOK.stop_ids, pretrain_iter=ptx, mesh=mesh)
items = make_prompt_items(toy_prompts(8, TOK), TOK, TOY_CONDITIONS)
m = tr.iterate(items)
keys = ("reward", "kl", "policy_loss", "clip_frac", "value_loss", "pretrain_loss", "actor_grad_norm",
        "critic_grad_norm", "response_length")
print("METRICS " + json.dumps({k: m[k] for k in keys}), flush=True)
