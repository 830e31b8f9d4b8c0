"""PPO / GRPO on a tiny model with a programmatic reward: reward rises, KL bounded, critic warm-up, ptx."""

import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from internlm2_jax import get_preset, init_params
from internlm2_jax.rlhf.ppo_trainer import PPOConfig, PPOTrainer, actor_loss
from internlm2_jax.rlhf.reward_model import init_reward_params
from internlm2_jax.rlhf.rollout import make_prompt_items
from internlm2_jax.rlhf.toy_tasks import (TOY_CONDITIONS, CharTokenizer, target_token_reward, toy_pretrain_batches,
                                          toy_prompts)
from internlm2_jax.train.optimizer import OptimizerConfig, make_optimizer

TOK = CharTokenizer()
CFG = get_preset("tiny", dtype="float32", vocab_size=TOK.vocab_size)
TARGET = TOK.encode("a")[0]
TX = make_optimizer(OptimizerConfig(peak_lr=3e-3, warmup_steps=0, schedule="constant", weight_decay=0.0))
ITEMS = make_prompt_items(toy_prompts(64, TOK), TOK, TOY_CONDITIONS)


def _reward(items, responses):
    return target_token_reward(responses, TARGET)


def _trainer(**kw):
    actor = init_params(CFG, jax.random.key(0))
    critic = init_reward_params(CFG, jax.random.key(1), backbone=actor)
    cfg = PPOConfig(**{**dict(batch_size=16, max_prompt_len=32, max_new_tokens=8, critic_warmup_iters=2,
                              ptx_coef=0.0, kl_coef=0.05, top_p=1.0), **kw})
    pt = toy_pretrain_batches(TOK, 4, 32) if cfg.ptx_coef > 0 else None
    return PPOTrainer(CFG, cfg, actor, critic, _reward, TX, TX, stop_ids=TOK.stop_ids,
                      pretrain_iter=pt)


def _run(tr, iters):
    hist = []
    for i in range(iters):
        n = tr.cfg.batch_size
        hist.append(tr.iterate([ITEMS[(i * n + j) % len(ITEMS)] for j in range(n)]))
    return hist


def _same(a, b):
    return all(bool(jnp.array_equal(x, y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize("algo", [pytest.param("ppo", marks=pytest.mark.slow), "grpo"])
def test_reward_rises_with_bounded_kl(algo):
    t0 = time.time()
    tr = _trainer(algo=algo, batch_size=16 if algo == "ppo" else 4, group_size=4, kl_coef=0.02, ppo_epochs=2)
    hist = _run(tr, 30 if algo == "ppo" else 20)
    rewards = [h["reward"] for h in hist]
    first, last = np.mean(rewards[:5]), np.mean(rewards[-5:])
    kl_per_token = hist[-1]["kl"] / hist[-1]["response_length"]
    print(f"{algo} reward curve {np.round(rewards, 3).tolist()} kl/token {kl_per_token:.3f} {time.time() - t0:.1f}s")
    assert first < 0.05 and last > 0.25, rewards
    # Bounded: the reference is near-uniform, so a collapsed (deterministic) policy would be at log 102 ≈ 4.6.
    assert 0.0 <= kl_per_token < 3.5
    for k in ("time/generation", "time/scoring", "time/training", "rollout_tokens_per_s", "train_tokens_per_s",
              "entropy", "clip_frac", "response_length"):
        assert np.isfinite(hist[-1][k]), k
    if algo == "ppo":
        assert np.isfinite(hist[-1]["value_loss"])


def test_critic_warmup_freezes_actor():
    tr = _trainer(critic_warmup_iters=2, ptx_coef=0.5)
    actor0 = jax.tree.map(np.array, tr.state.actor)
    critic0 = jax.tree.map(np.array, tr.state.critic)
    hist = _run(tr, 2)
    assert all(h["actor_frozen"] == 1.0 for h in hist)
    assert _same(tr.state.actor, actor0), "actor changed during critic warm-up"
    assert not _same(tr.state.critic, critic0), "critic did not train during warm-up"
    hist = _run(tr, 1)
    assert hist[0]["actor_frozen"] == 0.0 and hist[0]["pretrain_loss"] > 0
    assert not _same(tr.state.actor, actor0)


def test_ptx_coefficient_adds_exactly_half_the_pretrain_loss():
    tr = _trainer()
    batch, _, _ = tr.rollout(ITEMS[:8])
    pt = {k: jnp.asarray(v) for k, v in next(toy_pretrain_batches(TOK, 4, 32)).items()}
    actor = nn.meta.unbox(tr.state.actor)
    l0, m0 = actor_loss(CFG, actor, batch, pt, jnp.float32(0.0), jnp.float32(0.0), 0.2)
    l5, m5 = actor_loss(CFG, actor, batch, pt, jnp.float32(0.5), jnp.float32(0.0), 0.2)
    assert float(m0["pretrain_loss"]) > 0
    np.testing.assert_allclose(float(l5 - l0), 0.5 * float(m5["pretrain_loss"]), rtol=1e-5)
