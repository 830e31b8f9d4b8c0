"""Model-level check: logits and parameter gradients with attention_impl='pallas' equal 'xla'.

Tiny preset (head_dim 16, zero-padded inside the kernel), fp32, packed documents; the Pallas
kernels run in interpret mode on CPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import internlm2_jax
from internlm2_jax.config import get_preset
from internlm2_jax.model import init_params


def _logits_and_grads(impl: str, params, tokens, segment_ids, positions):
    cfg = get_preset("tiny", dtype="float32", attention_impl=impl)

    def loss(p):
        logits = internlm2_jax.forward(cfg, p, tokens, positions=positions, segment_ids=segment_ids)
        logp = jax.nn.log_softmax(logits[:, :-1])
        nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)
        return jnp.mean(nll), logits

    (_, logits), grads = jax.value_and_grad(loss, has_aux=True)(params)
    return logits, grads


def test_pallas_model_matches_xla():
    cfg = get_preset("tiny", dtype="float32", attention_impl="xla")
    params = init_params(cfg, jax.random.PRNGKey(0))
    b, s = 2, 24
    tokens = jax.random.randint(jax.random.PRNGKey(1), (b, s), 0, cfg.vocab_size)
    segment_ids = jnp.asarray(np.repeat([[0] * 9 + [1] * 10 + [2] * 5], b, axis=0), jnp.int32)
    # positions restart at each document, as the packing pipeline produces them
    starts = jnp.asarray([0] * 9 + [9] * 10 + [19] * 5)
    positions = jnp.broadcast_to(jnp.arange(s) - starts, (b, s))
    ref_logits, ref_grads = _logits_and_grads("xla", params, tokens, segment_ids, positions)
    logits, grads = _logits_and_grads("pallas", params, tokens, segment_ids, positions)
    np.testing.assert_allclose(logits, ref_logits, atol=1e-4, rtol=1e-4)
    flat, ref_flat = jax.tree.leaves(grads), jax.tree.leaves(ref_grads)
    assert len(flat) == len(ref_flat)
    for g, r in zip(flat, ref_flat):
        np.testing.assert_allclose(g, r, atol=1e-5, rtol=1e-3)


def test_pallas_decode_step_matches_xla():
    """The KV-cache decode path with attention_impl='pallas' uses the split-K kernel; same logits."""
    xla_cfg = get_preset("tiny", dtype="float32")
    pallas_cfg = get_preset("tiny", dtype="float32", attention_impl="pallas")
    params = init_params(xla_cfg, jax.random.PRNGKey(2))
    tokens = jax.random.randint(jax.random.PRNGKey(3), (2, 7), 0, xla_cfg.vocab_size)
    _, cache = internlm2_jax.prefill(xla_cfg, params, tokens, max_len=16, lengths=jnp.asarray([7, 4]))
    nxt = jnp.asarray([5, 9])
    ref, _ = internlm2_jax.decode_step(xla_cfg, params, cache, nxt)
    got, _ = internlm2_jax.decode_step(pallas_cfg, params, cache, nxt)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=2e-5)


def test_pallas_chunked_prefill_matches_xla():
    """Prefill chunks with attention_impl='pallas': the flash kernel over each chunk merged with the pass over the
    cache before it (log-sum-exp) gives the XLA path's logits and cache, for ragged prompts."""
    xla_cfg = get_preset("tiny", dtype="float32")
    pallas_cfg = get_preset("tiny", dtype="float32", attention_impl="pallas")
    params = init_params(xla_cfg, jax.random.PRNGKey(4))
    tokens = jax.random.randint(jax.random.PRNGKey(5), (2, 20), 0, xla_cfg.vocab_size)
    lengths = jnp.asarray([20, 13])
    run = lambda cfg: internlm2_jax.model.prefill_last(cfg, params, tokens, max_len=40, lengths=lengths, chunk=8)
    (ref, ref_cache), (got, cache) = run(xla_cfg), run(pallas_cfg)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=2e-5)
    for name in ("k", "v"):
        np.testing.assert_allclose(np.asarray(cache[name]), np.asarray(ref_cache[name]), atol=2e-5)
    # and a decode step after it: the decode kernel with the new token as an extra softmax term
    nxt = jnp.asarray([3, 7])
    ref_step, _ = internlm2_jax.decode_step(xla_cfg, params, ref_cache, nxt)
    got_step, _ = internlm2_jax.decode_step(pallas_cfg, params, cache, nxt)
    np.testing.assert_allclose(np.asarray(got_step), np.asarray(ref_step), atol=2e-5)
