"""KV-cache sampling: greedy equals repeated full forwards, top-k=1 is greedy, rng determinism, stops."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from internlm2_jax import forward, get_preset, init_params
from internlm2_jax.generate import generate, generate_stream, sample_logits

CFG = get_preset("tiny", dtype="float32")


@pytest.fixture(scope="module")
def params():
    p = nn.meta.unbox(init_params(CFG, jax.random.key(0)))
    # Spread the logits so greedy choices are not near-ties at fp32 rounding.
    return {**p, "output": p["output"] * 30.0}


PROMPTS = [[1, 5, 9, 33, 70], [1, 200, 3], [1, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23]]


_fwd = jax.jit(lambda p, t: forward(CFG, p, t))


def _greedy_reference(params, prompt, n):
    """Argmax of a fresh full forward per token (fixed 32-slot buffer: causal, so padding is inert)."""
    ids = list(prompt)
    for _ in range(n):
        buf = np.zeros((1, 32), np.int32)
        buf[0, : len(ids)] = ids
        ids.append(int(jnp.argmax(_fwd(params, jnp.asarray(buf))[0, len(ids) - 1])))
    return ids[len(prompt):]


def test_greedy_matches_full_forward(params):
    out = generate(CFG, params, PROMPTS, max_new_tokens=5, stop_ids=())
    for prompt, got in zip(PROMPTS, out):
        assert got == _greedy_reference(params, prompt, 5)


def test_top_k_one_is_greedy_and_sampling_is_deterministic(params):
    greedy = generate(CFG, params, PROMPTS, max_new_tokens=5, stop_ids=())
    k1 = generate(CFG, params, PROMPTS, max_new_tokens=5, stop_ids=(), temperature=1.0, top_k=1,
                  rng=jax.random.key(3))
    assert k1 == greedy
    kw = dict(max_new_tokens=5, stop_ids=(), temperature=5.0, top_p=0.9, rng=jax.random.key(7))
    a, b = generate(CFG, params, PROMPTS, **kw), generate(CFG, params, PROMPTS, **kw)
    assert a == b
    c = generate(CFG, params, PROMPTS, **{**kw, "rng": jax.random.key(8)})
    assert c != a  # hot sampling with a different key differs somewhere
    limited = generate(CFG, params, PROMPTS, **{**kw, "vocab_limit": 50})
    assert all(t < 50 for row in limited for t in row)


def test_stop_ids_end_a_row(params):
    free = generate(CFG, params, PROMPTS, max_new_tokens=5, stop_ids=())
    first = [i for i, t in enumerate(free[0]) if t not in free[0][:i]]
    cut0 = first[-1] if len(first) > 1 else first[0]
    stop = free[0][cut0]
    out = generate(CFG, params, PROMPTS, max_new_tokens=5, stop_ids=(stop, 99999))
    assert out[0] == free[0][: cut0 + 1]
    for f, o in zip(free[1:], out[1:]):
        cut = [i for i, t in enumerate(f) if t == stop]
        assert o == (f if not cut else f[: cut[0] + 1])


def test_stream_matches_generate(params):
    kw = dict(max_new_tokens=5, stop_ids=(), temperature=2.0, top_k=20, rng=jax.random.key(1))
    assert list(generate_stream(CFG, params, PROMPTS[1], **kw)) == generate(CFG, params, [PROMPTS[1]], **kw)[0]


def test_top_p_and_repetition_penalty():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    draws = {int(sample_logits(logits, jax.random.key(i), temperature=1.0, top_p=0.7)[0]) for i in range(200)}
    assert draws == {0, 1}
    # A strong penalty on a repeated token changes the greedy choice.
    from internlm2_jax.generate import apply_repetition_penalty
    pen = apply_repetition_penalty(logits + 5.0, jnp.asarray([[True, False, False, False]]), 10.0)
    assert int(jnp.argmax(pen[0])) == 1
    np.testing.assert_allclose(pen[0, 1:], (logits + 5.0)[0, 1:])
