"""Training core: chunked CE vs a naive reference, overfitting, grad accumulation, lr/decay mask."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from internlm2_jax.config import get_preset
from internlm2_jax.model import init_params
from internlm2_jax.sharding import MeshConfig, make_mesh
from internlm2_jax.train.loss import chunked_cross_entropy, next_token_targets
from internlm2_jax.train.optimizer import OptimizerConfig, lr_schedule, make_optimizer
from internlm2_jax.train.causal_lm import StepConfig, causal_lm_trainer, loss_and_grads

# Hand-built batch: row 0 packs two documents (segments 1, 2) then padding (segment 0); row 1 is one
# document whose first 3 tokens are the prompt (loss_mask 0).
TOKENS = np.array([[5, 9, 3, 7, 2, 8, 0], [4, 4, 6, 1, 9, 2, 3]], np.int32)
SEGS = np.array([[1, 1, 1, 2, 2, 0, 0], [1, 1, 1, 1, 1, 1, 1]], np.int32)
MASK = np.array([[1, 1, 1, 1, 1, 0, 0], [0, 0, 0, 1, 1, 1, 1]], np.int32)
# Position t predicts token t+1 iff t+1 is a loss target of the same (non-padding) segment:
# row 0: 0->1, 1->2 (doc 1), 3->4 (doc 2); row 1: 2->3, 3->4, 4->5, 5->6.
WEIGHTS = np.array([[1, 1, 0, 1, 0, 0, 0], [0, 0, 1, 1, 1, 1, 0]], np.float32)


def test_targets_match_hand_built_weights():
    targets, weights = next_token_targets(jnp.asarray(TOKENS), jnp.asarray(MASK), jnp.asarray(SEGS))
    np.testing.assert_array_equal(weights, WEIGHTS)
    np.testing.assert_array_equal(targets[:, :-1], TOKENS[:, 1:])


@pytest.mark.parametrize("chunk", [2, 4, 7])
def test_chunked_ce_equals_naive_reference(chunk):
    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.normal(size=(2, 7, 8)), jnp.float32)
    head = jnp.asarray(rng.normal(size=(8, 10)), jnp.float32)
    targets = np.concatenate([TOKENS[:, 1:], np.zeros((2, 1), np.int32)], axis=1)
    z = 1e-2
    got = chunked_cross_entropy(hidden, head, jnp.asarray(targets), jnp.asarray(WEIGHTS), chunk_size=chunk,
                                z_loss=z)
    logits = np.asarray(hidden) @ np.asarray(head)
    ce = optax.softmax_cross_entropy_with_integer_labels(jnp.asarray(logits), jnp.asarray(targets))
    lse = jax.scipy.special.logsumexp(logits, axis=-1)
    w = WEIGHTS
    np.testing.assert_allclose(got["loss_sum"], np.sum(ce * w), rtol=1e-5)
    np.testing.assert_allclose(got["z_loss_sum"], z * np.sum(lse**2 * w), rtol=1e-5)
    np.testing.assert_allclose(got["correct"], np.sum((logits.argmax(-1) == targets) * w))
    assert float(got["count"]) == 7.0
    # gradients of the mean loss agree too
    def naive(h):
        ce = optax.softmax_cross_entropy_with_integer_labels(h @ head, jnp.asarray(targets))
        return jnp.sum(ce * w) / w.sum()
    g_ref = jax.grad(naive)(hidden)
    g = jax.grad(lambda h: chunked_cross_entropy(h, head, jnp.asarray(targets), jnp.asarray(w),
                                                 chunk_size=chunk)["loss_sum"] / w.sum())(hidden)
    np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-7)


def _mesh():
    return make_mesh(MeshConfig(data=1), jax.devices()[:1])


@pytest.mark.outcome
def test_overfits_a_fixed_batch(seed):
    cfg = get_preset("tiny", dtype="float32")
    tokens = np.random.default_rng(seed + 1).integers(0, cfg.vocab_size, (4, 32)).astype(np.int32)
    tx = make_optimizer(OptimizerConfig(peak_lr=1e-2, warmup_steps=10, total_steps=200, weight_decay=0.0))
    trainer = causal_lm_trainer(cfg, tx, _mesh(), StepConfig(loss_chunk=16))
    state = trainer.init_state(jax.random.key(seed))
    first = None
    for _ in range(200):
        state, metrics = trainer.step(state, {"tokens": tokens})
        first = float(metrics["loss"]) if first is None else first
    loss = float(metrics["loss"])
    assert first > 5.0 and loss < 0.05, (first, loss)
    assert float(metrics["accuracy"]) == 1.0


def test_grad_accumulation_equals_one_big_batch():
    cfg = get_preset("tiny", dtype="float32")
    rng = np.random.default_rng(2)
    batch = {"tokens": jnp.asarray(rng.integers(0, cfg.vocab_size, (8, 16)), jnp.int32),
             "loss_mask": jnp.asarray(rng.random((8, 16)) > 0.3, jnp.int32)}
    params = nn.meta.unbox(init_params(cfg, jax.random.key(0)))
    out = {a: jax.jit(lambda p, b, a=a: loss_and_grads(cfg, p, b, StepConfig(grad_accum=a, loss_chunk=8)))(
        params, batch) for a in (1, 4)}
    np.testing.assert_allclose(out[1][0], out[4][0], rtol=1e-6)
    for g1, g4 in zip(jax.tree.leaves(out[1][1]), jax.tree.leaves(out[4][1])):
        np.testing.assert_allclose(g1, g4, rtol=1e-4, atol=1e-6 * float(jnp.abs(g1).max()))


def test_lr_schedule_by_hand():
    cfg = OptimizerConfig(peak_lr=1e-3, warmup_steps=10, total_steps=100, end_lr_ratio=0.1)
    lr = lr_schedule(cfg)
    assert float(lr(0)) == 0.0
    assert float(lr(5)) == pytest.approx(5e-4)
    assert float(lr(10)) == pytest.approx(1e-3)  # peak at warm-up end
    assert float(lr(55)) == pytest.approx(1e-4 + 9e-4 * 0.5 * (1 + np.cos(np.pi * 45 / 90)))
    assert float(lr(100)) == pytest.approx(1e-4)  # 10 % of peak at the end
    assert float(lr(1000)) == pytest.approx(1e-4)


def test_norm_scales_get_no_weight_decay():
    cfg = get_preset("tiny", dtype="float32")
    params = nn.meta.unbox(init_params(cfg, jax.random.key(0)))
    peak, wd = 1e-2, 0.1
    tx = make_optimizer(OptimizerConfig(peak_lr=peak, warmup_steps=1, weight_decay=wd))
    state = tx.init(params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    @jax.jit
    def update(p, state):
        updates, state = tx.update(zeros, state, p)
        return optax.apply_updates(p, updates), state

    p = params
    for _ in range(2):  # lr(0) = 0, lr(1) = peak; zero grads -> Adam update 0, only decay acts
        p, state = update(p, state)
    flat, _ = jax.tree_util.tree_flatten_with_path(p)
    orig = jax.tree.leaves(params)
    for (path, new), old in zip(flat, orig):
        name = jax.tree_util.keystr(path)
        if "scale" in name:
            np.testing.assert_array_equal(new, old, err_msg=name)
        else:
            np.testing.assert_allclose(new, old * (1 - peak * wd), rtol=1e-6, err_msg=name)
