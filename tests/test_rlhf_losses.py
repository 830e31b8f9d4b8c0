"""RLHF loss pieces vs hand-computed values and plain numpy loops: reward loss, GAE, KL, PPO, DPO, GRPO."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from internlm2_jax.rlhf.dpo import dpo_loss
from internlm2_jax.rlhf.gae import gae
from internlm2_jax.rlhf.algorithms.grpo import group_advantages
from internlm2_jax.rlhf.ppo import kl_estimate, policy_loss, token_rewards, value_loss, whiten
from internlm2_jax.rlhf.reward_loss import log_barrier, ranking_loss, reward_loss


def _sig(x):
    return 1 / (1 + math.exp(-x))


def test_ranking_loss_hand_values_and_gamma_decay():
    p = _sig(1.0)  # r_c − r_r = 1: confident pair, down-weighted by (1 − 2(P − ½))^γ
    want = (1 - 2 * (p - 0.5)) ** 2 * -math.log(p)
    got = ranking_loss(jnp.array([1.0, 0.0]), jnp.array([0.0, 1.0]), gamma=2.0)
    np.testing.assert_allclose(got, [want, -math.log(_sig(-1.0))], rtol=1e-6)  # wrong order: P < ½, weight 1
    assert abs(want - 0.0906322) < 1e-6  # (1 − 2·0.2310586)² · 0.3132617
    # γ = 0 is plain −log σ; larger γ decays confident pairs faster.
    np.testing.assert_allclose(ranking_loss(jnp.array([1.0]), jnp.array([0.0]), gamma=0.0), [-math.log(p)], rtol=1e-6)
    l1, l2, l4 = (float(ranking_loss(jnp.array([2.0]), jnp.array([0.0]), gamma=g)[0]) for g in (1, 2, 4))
    assert l1 > l2 > l4 > 0


def test_barrier_values_and_gradient_sign():
    np.testing.assert_allclose(log_barrier(jnp.array([0.0, 3.0, -3.0])),
                               [-2 * math.log(5), -math.log(16), -math.log(16)], rtol=1e-6)
    grad = jax.grad(lambda r: log_barrier(r).sum())(jnp.array([4.9, -4.9, 5.5, -7.0, 0.0]))
    # Gradient descent moves r toward 0: positive slope above 0, negative below, zero at 0.
    assert grad[0] > 0 and grad[1] < 0 and grad[2] > 0 and grad[3] < 0 and grad[4] == 0
    np.testing.assert_allclose(grad[0], 1 / 0.1 - 1 / 9.9, rtol=1e-5)
    vals = log_barrier(jnp.array([5.0, 6.0, -50.0]))  # clamped: finite even at / beyond the bound
    assert np.all(np.isfinite(vals)) and vals[1] > vals[0]


def test_reward_loss_combines_terms_with_mask():
    rc, rr, mask = jnp.array([1.0, 0.5, 9.0]), jnp.array([0.0, 2.0, 9.0]), jnp.array([1.0, 1.0, 0.0])
    loss, m = reward_loss(rc, rr, mask, gamma=2.0, barrier_weight=0.02)
    def one(a, b):
        p = _sig(a - b)
        bar = -(math.log(5 - a) + math.log(5 + a)) - (math.log(5 - b) + math.log(5 + b))
        return (1 - 2 * max(0, p - 0.5)) ** 2 * -math.log(p) + 0.02 * bar
    np.testing.assert_allclose(loss, (one(1.0, 0.0) + one(0.5, 2.0)) / 2, rtol=1e-6)
    assert float(m["accuracy"]) == 0.5 and float(m["count"]) == 2


def _np_gae(r, v, m, gamma, lam):
    b, t = r.shape
    adv = np.zeros((b, t))
    for i in range(b):
        last = 0.0
        for j in reversed(range(t)):
            if not m[i, j]:
                last = 0.0
                continue
            nv = v[i, j + 1] if j + 1 < t and m[i, j + 1] else 0.0
            delta = r[i, j] + gamma * nv - v[i, j]
            last = delta + gamma * lam * last
            adv[i, j] = last
    return adv, (adv + v) * m


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.99), (0.9, 0.95), (1.0, 1.0)])
def test_gae_matches_numpy(gamma, lam):
    rng = np.random.default_rng(0)
    r, v = rng.normal(size=(3, 7)), rng.normal(size=(3, 7))
    m = np.zeros((3, 7))
    m[0, 2:6], m[1, 0:7], m[2, 4:5] = 1, 1, 1
    adv, ret = gae(jnp.asarray(r), jnp.asarray(v), jnp.asarray(m), gamma=gamma, lam=lam)
    want_adv, want_ret = _np_gae(r, v, m, gamma, lam)
    np.testing.assert_allclose(adv, want_adv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ret, want_ret, rtol=1e-5, atol=1e-5)


def test_kl_estimators_and_token_rewards_match_numpy():
    rng = np.random.default_rng(1)
    lp, ref = np.log(rng.uniform(0.05, 1, (2, 5))), np.log(rng.uniform(0.05, 1, (2, 5)))
    np.testing.assert_allclose(kl_estimate(jnp.asarray(lp), jnp.asarray(ref), "k1"), lp - ref, rtol=1e-5, atol=1e-6)
    ratio = np.exp(ref - lp)
    k3 = np.asarray(kl_estimate(jnp.asarray(lp), jnp.asarray(ref), "k3"))
    np.testing.assert_allclose(k3, ratio - 1 - np.log(ratio), rtol=1e-5, atol=1e-7)
    assert np.all(k3 >= 0)
    mask = np.array([[0, 1, 1, 1, 0], [1, 1, 0, 0, 0]], np.float32)
    kl = lp - ref
    want = -0.01 * kl * mask
    want[0, 3] += 2.0
    want[1, 1] += -1.0
    got = token_rewards(jnp.array([2.0, -1.0]), jnp.asarray(kl), jnp.asarray(mask), 0.01)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_policy_value_loss_and_whiten_match_numpy():
    rng = np.random.default_rng(2)
    lp, old, adv = rng.normal(size=(2, 4)) * 0.3, rng.normal(size=(2, 4)) * 0.3, rng.normal(size=(2, 4))
    mask = np.array([[1, 1, 1, 0], [0, 1, 1, 1]], np.float32)
    ratio = np.exp(lp - old)
    per = np.maximum(-adv * ratio, -adv * np.clip(ratio, 0.8, 1.2))
    loss, m = policy_loss(*(jnp.asarray(x) for x in (lp, old, adv, mask)), clip=0.2)
    np.testing.assert_allclose(loss, (per * mask).sum() / mask.sum(), rtol=1e-5)
    v, ov, ret = rng.normal(size=(3, 2, 4))
    vc = ov + np.clip(v - ov, -0.2, 0.2)
    want = 0.5 * (np.maximum((v - ret) ** 2, (vc - ret) ** 2) * mask).sum() / mask.sum()
    np.testing.assert_allclose(value_loss(*(jnp.asarray(x) for x in (v, ov, ret, mask)), clip=0.2)[0], want, rtol=1e-5)
    w = np.asarray(whiten(jnp.asarray(adv), jnp.asarray(mask)))
    sel = adv[mask > 0]
    np.testing.assert_allclose(w[mask > 0], (sel - sel.mean()) / sel.std(), rtol=1e-4)
    assert np.all(w[mask == 0] == 0)


def test_dpo_loss_hand_values():
    pc, pr, rc, rr = jnp.array([-3.0]), jnp.array([-5.0]), jnp.array([-4.0]), jnp.array([-4.5])
    h = (-3 + 4) - (-5 + 4.5)  # 1.5
    loss, m = dpo_loss(pc, pr, rc, rr, beta=0.1)
    np.testing.assert_allclose(loss, -math.log(_sig(0.15)), rtol=1e-6)
    loss_ls, _ = dpo_loss(pc, pr, rc, rr, beta=0.1, label_smoothing=0.1)
    np.testing.assert_allclose(loss_ls, -0.9 * math.log(_sig(0.15)) - 0.1 * math.log(_sig(-0.15)), rtol=1e-6)
    assert float(m["reward_accuracy"]) == 1.0 and abs(float(m["reward_margin"]) - 0.1 * h) < 1e-6


def test_grpo_group_advantages_match_numpy():
    scores = np.array([1.0, 0.0, 0.5, 0.5, 2.0, 2.0, 2.0, 2.0, 3.0, -1.0, 0.0, 1.0], np.float32)
    got = np.asarray(group_advantages(jnp.asarray(scores), 4))
    want = np.zeros(12)
    for g in range(3):
        s = scores[4 * g: 4 * g + 4]
        want[4 * g: 4 * g + 4] = (s - s.mean()) / (s.std() + 1e-6)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert np.all(got[4:8] == 0)  # equal rewards → no signal
