"""RL algorithms by name (RLOO added as one file + a registration, and training the tiny task), NaN safety of the
clamped losses, the sampling temperature in log-probs, reward shaping, and the critic reading the RM's layout."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from internlm2_jax import get_preset
from internlm2_jax.model import forward
from internlm2_jax.rlhf.algorithms import Algorithm, get_algorithm, register
from internlm2_jax.rlhf.logprobs import policy_logprobs
from internlm2_jax.rlhf.ppo import LOG_RATIO_CLAMP, kl_estimate, masked_mean, policy_loss
from internlm2_jax.rlhf.reward_model import init_policy, init_reward_params, token_values
from internlm2_jax.rlhf.rl_trainer import RLConfig, RLTrainer, compute_advantages, shape_scores
from internlm2_jax.rlhf.rollout import critic_layout, critic_values, make_prompt_items
from internlm2_jax.rlhf.toy_tasks import TOY_CONDITIONS, CharTokenizer, target_token_reward, toy_prompts
from internlm2_jax.train.optimizer import OptimizerConfig, make_optimizer

TOK = CharTokenizer()
CFG = get_preset("tiny", dtype="float32", vocab_size=TOK.vocab_size)


def test_rloo_advantages_by_hand():
    cfg = RLConfig(algo="rloo", group_size=3, kl_coef=0.5)
    scores = jnp.array([1.0, 0.0, 2.0, 5.0, 5.0, 5.0])
    mask = jnp.array([[0, 1, 1, 0]] * 6, jnp.float32)
    kl = jnp.zeros((6, 4)).at[0, 1].set(2.0)  # response 0: sum KL 2 → reward 1 − 0.5·2 = 0
    stats = {"old_logp": kl, "ref_logp": jnp.zeros((6, 4))}  # k1 estimate = old_logp − ref_logp = kl
    out = compute_advantages(cfg, stats, scores, mask)
    r = np.array([0.0, 0.0, 2.0])  # group 1 rewards after the KL penalty; group 2 all equal
    want = np.concatenate([r - (r.sum() - r) / 2, np.zeros(3)])
    np.testing.assert_allclose(np.asarray(out["advantages"])[:, 1], want, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(out["advantages"])[:, [0, 3]], 0.0)
    assert "returns" not in out and not get_algorithm("rloo").needs_critic


def test_registry_names_the_known_algorithms():
    with pytest.raises(ValueError, match=r"unknown RL algorithm 'nope'.*'grpo'.*'ppo'.*'rloo'"):
        get_algorithm("nope")
    with pytest.raises(ValueError, match="already registered"):
        register(Algorithm("ppo", lambda *a: {}))


@pytest.mark.outcome
def test_rloo_trains_the_tiny_task(seed):
    actor = init_policy(CFG, jax.random.key(2 * seed))
    tx = make_optimizer(OptimizerConfig(peak_lr=3e-3, warmup_steps=0, schedule="constant", weight_decay=0.0))
    cfg = RLConfig(algo="rloo", batch_size=4, group_size=4, max_prompt_len=32, max_new_tokens=8, top_p=1.0,
                   kl_coef=0.02, ppo_epochs=2, ptx_coef=0.0)
    target = TOK.encode("a")[0]
    tr = RLTrainer(CFG, cfg, actor, None, lambda items, r: target_token_reward(r, target), tx,
                   stop_ids=TOK.stop_ids, seed=seed)
    items = make_prompt_items(toy_prompts(64, TOK), TOK, TOY_CONDITIONS)
    rewards = [tr.iterate([items[(i * 4 + j) % len(items)] for j in range(4)])["reward"] for i in range(28)]
    print("rloo reward curve", np.round(rewards, 3).tolist())
    # seeds 0-4: first five <= 0.02, last five >= 0.75
    assert np.mean(rewards[:5]) < 0.05 and np.mean(rewards[-5:]) > 0.25, rewards


def test_extreme_log_ratios_stay_finite():
    """A padded slot with log ratio 100 used to give NaN (0·inf), a valid one inf; both are clamped now."""
    logp = jnp.array([[0.0, 100.0, -100.0, 100.0]])
    old = jnp.zeros((1, 4))
    adv = jnp.array([[1.0, 1.0, -1.0, 0.0]])
    mask = jnp.array([[1.0, 1.0, 1.0, 0.0]])  # the last slot is padding
    loss, m = policy_loss(logp, old, adv, mask, clip=0.2)
    assert np.isfinite(float(loss)) and np.isfinite(float(m["approx_kl"]))
    # By hand: slot 0 ratio 1 → −1; slot 1 ratio e^20 clipped to 1.2 → max(−e^20, −1.2) = −1.2; slot 2 ratio e^−20
    # with A = −1 → max(e^−20, 0.8) = 0.8.
    np.testing.assert_allclose(float(loss), (-1.0 - 1.2 + 0.8) / 3, rtol=1e-6)
    for kind in ("k1", "k2", "k3"):
        kl = kl_estimate(logp, old, kind)
        assert np.all(np.isfinite(np.asarray(kl))), kind
    np.testing.assert_allclose(float(kl_estimate(jnp.array(100.0), jnp.array(0.0), "k1")), LOG_RATIO_CLAMP)
    assert np.isfinite(float(masked_mean(jnp.array([1.0, jnp.nan]), jnp.array([1.0, 0.0]))))


def test_logprobs_use_the_sampling_temperature():
    params = nn.meta.unbox(init_policy(CFG, jax.random.key(0)))
    tokens = jax.random.randint(jax.random.key(1), (2, 12), 6, CFG.vocab_size)
    logits = forward(CFG, params, tokens)[:, :-1] / 0.7
    want = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), tokens[:, 1:, None], -1)[..., 0]
    for chunk in (0, 4):
        got, _ = policy_logprobs(CFG, params, tokens, chunk, temperature=0.7)
        np.testing.assert_allclose(np.asarray(got[:, 1:]), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_reward_shaping():
    cfg = RLConfig(missing_eos_penalty=-1.0, reward_clip=0.5)
    out = shape_scores(cfg, np.array([0.2, 0.2, 3.0]), [[5, 2], [5, 6], [4, 2]], stop_ids=(2,))
    np.testing.assert_allclose(out, [0.2, -0.5, 0.5])  # no stop id: 0.2 − 1 → −0.8 → clipped to −0.5
    norm = shape_scores(dataclasses.replace(cfg, missing_eos_penalty=None, normalize_rewards=True, reward_clip=None),
                        np.array([1.0, 3.0]), [[2], [2]], stop_ids=(2,))
    np.testing.assert_allclose(norm, [-1.0, 1.0], rtol=1e-6)


def test_critic_reads_the_reward_model_layout():
    """V(action j) is the RM-initialised critic's head at the position before it in the RM's own sequence."""
    critic = init_reward_params(CFG, jax.random.key(3))
    critic["v_head"] = jax.random.normal(jax.random.key(4), critic["v_head"].shape)
    prompts, prefixes, responses = [[1, 7, 8], [1, 9]], [[1, 30, 31, 7, 8], [1, 32, 9]], [[10, 11], [12, 13, 14]]
    seq_len = 8
    layout = critic_layout(prefixes, prompts, responses, seq_len)
    mask = np.zeros((2, seq_len), np.float32)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        mask[i, len(p):len(p) + len(r)] = 1.0
    values = np.asarray(critic_values(CFG, critic, {**layout, "action_mask": mask}))
    for i, (p, pre, r) in enumerate(zip(prompts, prefixes, responses)):
        direct = np.asarray(token_values(CFG, critic, jnp.asarray([pre + r])))[0]
        np.testing.assert_allclose(values[i, len(p):len(p) + len(r)], direct[len(pre) - 1:len(pre) - 1 + len(r)],
                                   rtol=1e-5)
