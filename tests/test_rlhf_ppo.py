"""PPO / GRPO on a tiny model with a programmatic reward: reward rises, KL bounded, critic warm-up, ptx."""

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from internlm2_jax import get_preset
from internlm2_jax.rlhf.rl_trainer import RLConfig, RLTrainer
from internlm2_jax.rlhf.reward_model import init_policy, init_reward_params
from internlm2_jax.rlhf.rollout import make_prompt_items
from internlm2_jax.rlhf.toy_tasks import (TOY_CONDITIONS, CharTokenizer, target_token_reward, toy_pretrain_batches,
                                          toy_prompts)
from internlm2_jax.train.optimizer import OptimizerConfig, make_optimizer

TOK = CharTokenizer()
CFG = get_preset("tiny", dtype="float32", vocab_size=TOK.vocab_size)
TARGET = TOK.encode("a")[0]
TX = make_optimizer(OptimizerConfig(peak_lr=3e-3, warmup_steps=0, schedule="constant", weight_decay=0.0))
ITEMS = make_prompt_items(toy_prompts(64, TOK), TOK, TOY_CONDITIONS)


PPO_KEYS = ("tokens", "action_mask", "old_logp", "ref_logp", "advantages", "returns", "old_values")


def _reward(items, responses):
    return target_token_reward(responses, TARGET)


@functools.lru_cache(maxsize=1)
def _init(seed: int = 0):
    """Initial actor / critic shared by every trainer (trainers copy them onto their mesh)."""
    actor = init_policy(CFG, jax.random.key(2 * seed))
    return actor, init_reward_params(CFG, jax.random.key(2 * seed + 1), backbone=actor)


def _trainer(seed: int = 0, **kw):
    """PPO trainers built with the same model, optimizers and mesh share their compiled steps."""
    actor, critic = _init(seed)
    cfg = RLConfig(**{**dict(batch_size=16, max_prompt_len=32, max_new_tokens=8, critic_warmup_iters=2,
                              ptx_coef=0.0, kl_coef=0.05, top_p=1.0), **kw})
    pt = toy_pretrain_batches(TOK, 4, 32) if cfg.ptx_coef > 0 else None
    return RLTrainer(CFG, cfg, actor, critic, _reward, TX, TX, stop_ids=TOK.stop_ids, pretrain_iter=pt)


def _run(tr, iters, start=0):
    hist = []
    for i in range(start, start + iters):
        n = tr.cfg.batch_size
        hist.append(tr.iterate([ITEMS[(i * n + j) % len(ITEMS)] for j in range(n)]))
    return hist


def _same(a, b):
    return all(bool(jnp.array_equal(x, y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.outcome
@pytest.mark.parametrize("algo", [pytest.param("ppo", marks=pytest.mark.slow), "grpo"])
def test_reward_rises_with_bounded_kl(algo, seed):
    t0 = time.time()
    tr = _trainer(seed, algo=algo, batch_size=16 if algo == "ppo" else 4, group_size=4, kl_coef=0.02, ppo_epochs=2)
    hist = _run(tr, 30 if algo == "ppo" else 20)
    rewards = [h["reward"] for h in hist]
    first, last = np.mean(rewards[:5]), np.mean(rewards[-5:])
    kl_per_token = hist[-1]["kl"] / hist[-1]["response_length"]
    print(f"{algo} reward curve {np.round(rewards, 3).tolist()} kl/token {kl_per_token:.3f} {time.time() - t0:.1f}s")
    assert first < 0.05 and last > 0.25, rewards
    # Bounded: the reference is near-uniform, so a collapsed (deterministic) policy would be at log 102 ≈ 4.6.
    # (At reward 0.5-0.8 the KL is already 2.7-4.0 nats/token: a fixed bound like 3.5 fails on some seeds.)
    assert 0.0 <= kl_per_token < np.log(CFG.vocab_size)
    if algo == "grpo":  # the KL term controls it: a strong coefficient keeps the policy near the reference
        strong = _run(_trainer(seed, algo=algo, batch_size=4, group_size=4, kl_coef=1.0, ppo_epochs=2), 20)
        kl_strong = strong[-1]["kl"] / strong[-1]["response_length"]
        print(f"kl/token with kl_coef=1: {kl_strong:.3f}")
        assert kl_strong < 0.5 < kl_per_token  # seeds 0-5: <= 0.12 vs >= 2.7
    for k in ("time/generation", "time/scoring", "time/training", "rollout_tokens_per_s", "train_tokens_per_s",
              "entropy", "clip_frac", "response_length"):
        assert np.isfinite(hist[-1][k]), k
    if algo == "ppo":
        assert np.isfinite(hist[-1]["value_loss"])


@pytest.mark.outcome
def test_ppo_reward_increases_over_a_few_iterations(seed):
    """Fast PPO check (same compiled steps as the warm-up test, so nearly free): a trivially learnable
    reward (fraction of 'a') goes up within 32 cheap iterations (4 PPO epochs each; with 16 the gain was
    0.15-0.25 on some seeds, with 32 it is 0.45-0.73 on seeds 0-5)."""
    tr = _trainer(seed, critic_warmup_iters=1, ptx_coef=0.01, kl_coef=0.02, ppo_epochs=4)
    hist = _run(tr, 32)
    rewards = [h["reward"] for h in hist]
    print("fast ppo reward curve", np.round(rewards, 3).tolist())
    assert np.mean(rewards[-4:]) > np.mean(rewards[:4]) + 0.2, rewards
    assert np.isfinite(hist[-1]["value_loss"]) and np.isfinite(hist[-1]["kl"])


@pytest.fixture(scope="module")
def warm():
    """A PPO trainer with critic warm-up 2 and ptx 0.5, run for 2 (frozen-actor) + 1 iterations."""
    tr = _trainer(critic_warmup_iters=2, ptx_coef=0.5)
    actor0, critic0 = jax.tree.map(np.array, tr.state.actor), jax.tree.map(np.array, tr.state.critic)
    frozen = _run(tr, 2)
    snap = {"actor": jax.tree.map(np.array, tr.state.actor), "critic": jax.tree.map(np.array, tr.state.critic)}
    return {"trainer": tr, "actor0": actor0, "critic0": critic0, "frozen": frozen, "snap": snap,
            "after": _run(tr, 1, start=2)}


def test_critic_warmup_freezes_actor(warm):
    assert all(h["actor_frozen"] == 1.0 for h in warm["frozen"])
    assert _same(warm["snap"]["actor"], warm["actor0"]), "actor changed during critic warm-up"
    assert not _same(warm["snap"]["critic"], warm["critic0"]), "critic did not train during warm-up"
    assert warm["after"][0]["actor_frozen"] == 0.0 and warm["after"][0]["pretrain_loss"] > 0
    assert not _same(warm["trainer"].state.actor, warm["actor0"])


def test_ptx_coefficient_adds_exactly_half_the_pretrain_loss(warm):
    batch, _, _ = warm["trainer"].rollout(ITEMS[:16])
    sub = {k: np.asarray(batch[k]) for k in PPO_KEYS}
    pt = next(toy_pretrain_batches(TOK, 4, 32))
    # Metrics are computed before the update, on fresh trainers holding the same initial actor.
    m0, m5 = (jax.device_get(_trainer(ptx_coef=0.5).actor_update(sub, pt, {"ptx": jnp.float32(c),
                                                                            "kl_loss": jnp.float32(0.0)}))
              for c in (0.0, 0.5))
    assert float(m0["pretrain_loss"]) > 0
    np.testing.assert_allclose(float(m5["actor_loss"] - m0["actor_loss"]), 0.5 * float(m5["pretrain_loss"]),
                               rtol=1e-5)
    np.testing.assert_allclose(float(m5["policy_loss"]), float(m0["policy_loss"]), rtol=1e-6)


def test_nonfinite_minibatch_updates_are_skipped(warm):
    """NaN advantages / returns: both actor and critic updates are skipped and counted; state unchanged."""
    tr = warm["trainer"]
    batch, _, _ = tr.rollout(ITEMS[:tr.cfg.batch_size])
    bad = {**batch, "advantages": jnp.full_like(batch["advantages"], jnp.nan),
           "returns": jnp.full_like(batch["returns"], jnp.nan)}
    before = jax.tree.map(np.array, (tr.state.actor, tr.state.critic, tr.state.actor_opt, tr.state.critic_opt))
    m = tr.update(bad)
    assert m["skipped_updates"] == 2 * tr.cfg.ppo_epochs * tr.cfg.num_minibatches
    assert m["actor_finite"] == 0.0 and m["critic_finite"] == 0.0
    st = tr.state
    assert _same(before, (st.actor, st.critic, st.actor_opt, st.critic_opt))
