"""Continuous-batching engine (`internlm2_jax.serving.engine`) against the one-batch `generate` path.

Each request's output must not depend on what else is in the batch: greedy and seeded sampling are compared
with the same request served alone, and greedy with `generate` (prefill in one piece, its own decode loop).
"""

from __future__ import annotations

import dataclasses
import threading
import time

import flax.linen as nn
import jax
import numpy as np
import pytest

from internlm2_jax import get_preset, init_params
from internlm2_jax.generate import generate
from internlm2_jax.serving.engine import Engine, EngineConfig, QueueFull, SamplingParams
from internlm2_jax.sft.quantize import IN_NDIM, dequantize, is_quantized, quantize_base

CFG = get_preset("tiny", vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, dtype="float32")
# Prompts from 3 to 45 tokens: with prefill_chunk 16 the longer ones are prefilled in 2-3 pieces.
PROMPTS = [list(np.random.default_rng(i).integers(3, 512, size=n)) for i, n in enumerate(
    [3, 45, 17, 8, 30, 16, 5, 33, 12, 21])]
ENGINE = EngineConfig(slots=4, max_len=96, prefill_chunk=16, max_queue=32)


@pytest.fixture(scope="module")
def params():
    # Large init spread: logits far apart, so greedy choices are not decided by rounding.
    return nn.meta.unbox(init_params(dataclasses.replace(CFG, initializer_range=0.2), jax.random.key(0)))


@pytest.fixture(scope="module")
def engine(params):
    eng = Engine(CFG, params, ENGINE).start()
    yield eng
    eng.stop()


def _alone(params, prompt, sampling):
    eng = Engine(CFG, params, ENGINE).start()
    try:
        return eng.generate(prompt, sampling, timeout=120)
    finally:
        eng.stop()


def _concurrent(eng, prompts, samplings):
    results: dict[int, tuple] = {}
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, eng.generate(prompts[i], samplings[i],
                                                                                        timeout=300)))
               for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [results[i] for i in range(len(prompts))]


def test_greedy_equals_generate_and_does_not_depend_on_the_batch(params, engine):
    greedy = SamplingParams(max_tokens=12, temperature=0.0)
    want = [generate(CFG, params, [p], max_new_tokens=12, stop_ids=())[0] for p in PROMPTS]
    got = _concurrent(engine, PROMPTS, [greedy] * len(PROMPTS))  # 10 requests, 4 slots: joins and leaves
    assert [g[0] for g in got] == want
    assert all(g[1] == "length" for g in got)
    assert _alone(params, PROMPTS[1], greedy)[0] == want[1]


def test_seeded_sampling_is_the_same_alone_and_in_a_batch(params, engine):
    kinds = [SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, seed=7),
             SamplingParams(max_tokens=10, temperature=0.8, top_k=20, seed=8),
             SamplingParams(max_tokens=10, temperature=0.0)]
    samplings = [kinds[i % 3] for i in range(len(PROMPTS))]
    got = _concurrent(engine, PROMPTS, samplings)
    for i in (0, 1, 4):
        assert got[i] == _alone(params, PROMPTS[i], samplings[i])
    assert got[0][0] != got[3][0] or PROMPTS[0] == PROMPTS[3]


def test_stop_ids_end_a_request_with_the_stop_token(params, engine):
    free, _ = engine.generate(PROMPTS[2], SamplingParams(max_tokens=8), timeout=60)
    stop = free[3]
    out, reason = engine.generate(PROMPTS[2], SamplingParams(max_tokens=8, stop_ids=(stop,)), timeout=60)
    assert reason == "stop" and out == free[:free.index(stop) + 1]


def test_cancel_frees_the_slot_and_the_queue_is_bounded(params):
    eng = Engine(CFG, params, EngineConfig(slots=1, max_len=96, prefill_chunk=16, max_queue=1)).start()
    try:
        events = []
        first = eng.submit(PROMPTS[0], SamplingParams(max_tokens=90), events.append)
        while eng.stats()["active"] == 0:  # admitted: the queue is empty again
            time.sleep(0.01)
        eng.submit(PROMPTS[3], SamplingParams(max_tokens=2), lambda ev: None)
        with pytest.raises(QueueFull):
            eng.submit(PROMPTS[3], SamplingParams(max_tokens=2), lambda ev: None)
        first.cancel()
        deadline = time.time() + 60
        while (not events or events[-1].finish_reason is None or eng.stats()["queued"]) and time.time() < deadline:
            time.sleep(0.01)
        out, reason = eng.generate(PROMPTS[3], SamplingParams(max_tokens=2), timeout=60)
        assert reason == "length" and len(out) == 2
        assert events[-1].finish_reason == "cancelled" and len(events) < 90
        assert eng.stats()["active"] == 0
    finally:
        eng.stop()


@pytest.mark.parametrize("bad, message", [
    (dict(prompt=[], sampling=SamplingParams()), "empty"),
    (dict(prompt=[1] * 90, sampling=SamplingParams(max_tokens=10)), "at most 6 new tokens"),
    (dict(prompt=[600], sampling=SamplingParams()), "token ids"),
    (dict(prompt=[1], sampling=SamplingParams(top_p=0.0)), "top_p"),
])
def test_bad_requests_are_value_errors(engine, bad, message):
    with pytest.raises(ValueError, match=message):
        engine.submit(bad["prompt"], bad["sampling"], lambda ev: None)


@pytest.mark.parametrize("kind, bits", [("int8", 8), ("int4", 4)])
def test_quantized_weights_match_generate_on_the_dequantized_model(params, kind, bits):
    deq = jax.tree.map(dequantize, quantize_base(params, tuple(IN_NDIM), bits), is_leaf=is_quantized)
    want = generate(CFG, deq, [PROMPTS[1]], max_new_tokens=8, stop_ids=())[0]
    eng = Engine(CFG, params, EngineConfig(slots=2, max_len=96, prefill_chunk=16, weights=kind)).start()
    try:
        assert eng.generate(PROMPTS[1], SamplingParams(max_tokens=8), timeout=60)[0] == want
    finally:
        eng.stop()


def test_int8_kv_cache_tracks_the_float_model(params):
    """int8 k/v (absmax per token and head) against the float forward: logits close, greedy mostly the same."""
    import jax.numpy as jnp

    from internlm2_jax.layers.attention import quantize_kv
    from internlm2_jax.model import extend, forward, init_cache

    x = jax.random.normal(jax.random.key(3), (2, 5, 2, 16)) * 3
    q, scale = quantize_kv(x)
    assert q.dtype == jnp.int8 and bool(jnp.all(jnp.abs(q.astype(jnp.float32) * scale - x) <= scale / 2 + 1e-6))

    tokens = jnp.asarray([PROMPTS[1]])
    want = forward(CFG, params, tokens)[0]  # [45, V]
    cache = init_cache(CFG, 1, 64, jnp.int8)
    assert cache["k"].dtype == jnp.int8 and cache["k_scale"].shape == cache["k"].shape[:-1] + (1,)
    got = []
    for t in range(tokens.shape[1]):  # token by token: every step reads the quantized cache
        logits, cache = extend(CFG, params, cache, tokens[:, t:t + 1], jnp.zeros((1,), jnp.int32))
        got.append(logits[0])
    got = jnp.stack(got)
    err = float(jnp.mean(jnp.abs(got - want)) / jnp.std(want))
    agree = float(jnp.mean(jnp.argmax(got, -1) == jnp.argmax(want, -1)))
    print(f"int8 kv: mean |logit error| / std = {err:.4f}, argmax agreement {agree:.3f}")
    assert 0 < err < 0.03 and agree >= 0.9, (err, agree)
    eng = Engine(CFG, params, EngineConfig(slots=2, max_len=96, prefill_chunk=16, kv_cache="int8")).start()
    try:
        out, reason = eng.generate(PROMPTS[1], SamplingParams(max_tokens=8), timeout=60)
        assert reason == "length" and len(out) == 8
    finally:
        eng.stop()


def test_extend_in_chunks_equals_the_full_forward(params):
    """Chunked prefill (`model.extend`, logits only at `last`) against one full forward pass."""
    import jax.numpy as jnp

    from internlm2_jax.model import extend, forward, init_cache

    tokens = jnp.asarray([PROMPTS[1]])  # 45 tokens: chunks of 16, 16 and 13 (+3 padding)
    want = forward(CFG, params, tokens)[0]
    cache = init_cache(CFG, 1, 64)
    for start, n in ((0, 16), (16, 16), (32, 13)):
        chunk = jnp.zeros((1, 16), jnp.int32).at[0, :n].set(tokens[0, start:start + n])
        logits, cache = extend(CFG, params, cache, chunk, jnp.asarray([n - 1]))
        cache = {**cache, "lengths": jnp.asarray([start + n])}
        np.testing.assert_allclose(np.asarray(logits[0]), np.asarray(want[start + n - 1]), rtol=1e-4, atol=1e-4)


def test_a_padded_prefill_chunk_running_past_the_cache_end(params):
    """110-token prompt, 64-token chunks, 120 cache positions: the second chunk (46 tokens, padded to 64) ends
    at 128; the writes past 120 are dropped and the output equals `generate`'s."""
    prompt = list(np.random.default_rng(7).integers(3, 512, size=110))
    sampling = SamplingParams(max_tokens=8, temperature=0.0, stop_ids=())
    eng = Engine(CFG, params, EngineConfig(slots=2, max_len=120, prefill_chunk=64)).start()
    try:
        out, reason = eng.generate(prompt, sampling, timeout=120)
    finally:
        eng.stop()
    assert reason == "length"
    assert out == generate(CFG, params, [prompt], max_new_tokens=8, stop_ids=())[0]
