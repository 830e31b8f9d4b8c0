"""Run under 8 fake CPU devices: one PPO actor/critic step and one RM step give the same losses on a
data=2, fsdp=2, tensor=2 mesh as on one device, with param shards really split."""

import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402

from internlm2_jax.config import get_preset  # noqa: E402
from internlm2_jax.rlhf.rl_trainer import RLConfig, RLTrainer  # noqa: E402
from internlm2_jax.rlhf.preference_data import pack_pairs, tokenize_pairs  # noqa: E402
from internlm2_jax.rlhf.reward_model import init_policy, init_reward_params  # noqa: E402
from internlm2_jax.rlhf.reward_task import RewardModelTask  # noqa: E402
from internlm2_jax.rlhf.toy_tasks import (  # noqa: E402
    TOY_CONDITIONS,
    CharTokenizer,
    toy_preference_records,
)
from internlm2_jax.sharding import MeshConfig, make_mesh, shard_shapes  # noqa: E402
from internlm2_jax.train.optimizer import OptimizerConfig, make_optimizer  # noqa: E402
from internlm2_jax.train.trainer import Trainer  # noqa: E402

assert jax.device_count() == 8
TOK = CharTokenizer()
cfg = get_preset("tiny", dtype="float32", num_key_value_heads=2, num_attention_heads=4, vocab_size=128,
                 num_hidden_layers=1)
tx = make_optimizer(OptimizerConfig(peak_lr=1e-3, warmup_steps=0, schedule="constant", weight_decay=0.0))
actor = init_policy(cfg, jax.random.key(0))
critic = init_reward_params(cfg, jax.random.key(1), backbone=actor)
critic["v_head"] = critic["v_head"] + 0.01  # non-zero head: the critic loss depends on the backbone too
rng = np.random.default_rng(0)
B, T = 8, 24
mask = np.zeros((B, T), np.float32)
mask[:, 10:20] = 1.0
batch = {"tokens": rng.integers(6, cfg.vocab_size, (B, T)).astype(np.int32), "action_mask": mask,
         "old_logp": (rng.normal(size=(B, T)) * 0.1 - 4.8).astype(np.float32),
         "ref_logp": (rng.normal(size=(B, T)) * 0.1 - 4.8).astype(np.float32),
         "advantages": rng.normal(size=(B, T)).astype(np.float32),
         "returns": rng.normal(size=(B, T)).astype(np.float32),
         "old_values": (rng.normal(size=(B, T)) * 0.1).astype(np.float32)}
pt = {"tokens": rng.integers(6, cfg.vocab_size, (4, T)).astype(np.int32), "loss_mask": np.ones((4, T), np.float32)}
coefs = {"ptx": np.float32(0.5), "kl_loss": np.float32(0.1)}
pairs, _ = tokenize_pairs(toy_preference_records(8), TOK, TOY_CONDITIONS, TOK.reward_id, max_len=64)
rm_batch = next(pack_pairs(pairs, token_budget=512, row_len=128, max_pairs=8, condition_names=sorted(TOY_CONDITIONS)))

results = {}
for name, mc in {"single": MeshConfig(data=1), "d2f2t2": MeshConfig(data=2, fsdp=2, tensor=2)}.items():
    mesh = make_mesh(mc, jax.devices()[:1] if name == "single" else None)
    tr = RLTrainer(cfg, RLConfig(logprob_chunk=8), actor, critic, lambda items, r: None, tx, tx, mesh=mesh)
    if name == "d2f2t2":
        a, c = shard_shapes(tr.state.actor), shard_shapes(tr.state.critic)
        assert a["layers"]["attention"]["wqkv"][1:3] == (64 // 2, 1), a["layers"]["attention"]["wqkv"]
        assert a["output"] == (64 // 2, cfg.vocab_size // 2), a["output"]
        assert c["v_head"] == (64 // 2, 1), c["v_head"]
        assert shard_shapes(tr.ref)["output"] == a["output"]
        mu = [x for x in jax.tree.leaves(tr.state.actor_opt)
              if x.shape == tr.state.actor["output"].shape and x.addressable_shards[0].data.shape == a["output"]]
        assert mu, "optimizer moments are not sharded like the params"
    cm = jax.block_until_ready(tr.critic_update(batch))
    am = jax.block_until_ready(tr.actor_update(batch, pt, coefs))
    rt = Trainer(RewardModelTask(cfg), tx, mesh)
    rm_state, rm = jax.block_until_ready(rt.step_host(rt.state_from_params(critic), rm_batch))
    params = rm_state.params
    if name == "d2f2t2":
        assert shard_shapes(params)["v_head"] == (32, 1) and shard_shapes(params)["backbone"]["tok_embeddings"] == (
            cfg.vocab_size // 2, 32), shard_shapes(params)["backbone"]["tok_embeddings"]
    results[name] = {"value_loss": float(cm["value_loss"]), "actor_loss": float(am["actor_loss"]),
                     "pretrain_loss": float(am["pretrain_loss"]), "rm_loss": float(rm["loss"]),
                     "actor_grad_norm": float(am["actor_grad_norm"]), "rm_grad_norm": float(rm["grad_norm"])}
    print(name, results[name], flush=True)

for k, v in results["single"].items():
    assert abs(results["d2f2t2"][k] - v) <= 1e-5 * max(abs(v), 1e-6), (k, results["d2f2t2"][k], v)
print("RLHF SHARDED OK")
