"""Model behaviour: packing isolation, KV-cache decoding, scan/remat equivalence, dtypes."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import internlm2_jax as ij

CFG = ij.get_preset("tiny", dtype="float32")


@pytest.fixture(scope="module")
def params():
    return ij.init_params(CFG, jax.random.key(0))


def test_packed_documents_do_not_attend_to_each_other(params):
    rng = np.random.default_rng(0)
    lens = [5, 9, 3]
    docs = [rng.integers(3, CFG.vocab_size, n) for n in lens]
    tokens = np.concatenate(docs + [np.zeros(3, np.int64)])[None]
    segs = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lens)] + [np.zeros(3, np.int64)])[None]
    pos = np.concatenate([np.arange(n) for n in lens] + [np.arange(3)])[None]
    packed = np.asarray(ij.forward(CFG, params, jnp.asarray(tokens), positions=jnp.asarray(pos),
                                   segment_ids=jnp.asarray(segs)))
    start = 0
    for doc in docs:
        alone = np.asarray(ij.forward(CFG, params, jnp.asarray(doc[None])))
        np.testing.assert_allclose(packed[0, start:start + len(doc)], alone[0], atol=1e-5)
        start += len(doc)


def test_prefill_then_decode_matches_full_forward(params):
    tokens = jax.random.randint(jax.random.key(1), (2, 14), 0, CFG.vocab_size)
    full = np.asarray(ij.forward(CFG, params, tokens))
    step = jax.jit(lambda c, t: ij.decode_step(CFG, params, c, t))
    logits, cache = ij.prefill(CFG, params, tokens[:, :5], max_len=20)
    np.testing.assert_allclose(np.asarray(logits), full[:, :5], atol=1e-5)
    for i in range(5, 14):
        out, cache = step(cache, tokens[:, i])
        np.testing.assert_allclose(np.asarray(out), full[:, i], atol=1e-5)
    assert list(np.asarray(cache["lengths"])) == [14, 14]


def test_decode_with_a_kv_window_and_in_place_writes(params):
    """`kv_window` reads only the first positions; the step writes the new k/v at each row's length and nowhere
    else (one scatter after the layer scan), also when the cache is donated."""
    tokens = jax.random.randint(jax.random.key(3), (2, 12), 0, CFG.vocab_size)
    full = np.asarray(ij.forward(CFG, params, tokens))
    step = jax.jit(lambda c, t: ij.decode_step(CFG, params, c, t, kv_window=16), donate_argnums=0)
    _, cache = ij.prefill(CFG, params, tokens[:, :4], max_len=40)
    before = {n: np.asarray(cache[n]) for n in ("k", "v")}
    for i in range(4, 12):
        out, cache = step(cache, tokens[:, i])
        np.testing.assert_allclose(np.asarray(out), full[:, i], atol=1e-5)
    for n in ("k", "v"):  # positions 12.. untouched (still the prefill's zeros), 0..3 unchanged
        after = np.asarray(cache[n])
        np.testing.assert_array_equal(after[:, :, 12:], before[n][:, :, 12:])
        np.testing.assert_array_equal(after[:, :, :4], before[n][:, :, :4])


def test_ragged_prompts_decode_per_row(params):
    """Right-padded prompts of different lengths continue each from its own length."""
    tokens = np.asarray(jax.random.randint(jax.random.key(2), (2, 10), 0, CFG.vocab_size))
    lengths = np.array([4, 7])
    padded = tokens.copy()
    padded[0, 4:7] = 0
    _, cache = ij.prefill(CFG, params, jnp.asarray(padded[:, :7]), max_len=12, lengths=jnp.asarray(lengths))
    nxt = np.array([tokens[0, 4], tokens[1, 7]])
    out, _ = ij.decode_step(CFG, params, cache, jnp.asarray(nxt))
    for row, n in enumerate(lengths):
        ref = np.asarray(ij.forward(CFG, params, jnp.asarray(tokens[row:row + 1, :n + 1])))[0, -1]
        np.testing.assert_allclose(np.asarray(out[row]), ref, atol=1e-5)


def test_scan_and_unrolled_layers_agree(params):
    cfg = dataclasses.replace(CFG, scan_layers=False)
    unrolled = {k: v for k, v in params.items() if k != "layers"}
    for i in range(CFG.num_hidden_layers):
        unrolled[f"layers_{i}"] = jax.tree.map(lambda x: x[i], jax.tree.map(
            lambda b: b.value, params["layers"], is_leaf=lambda b: hasattr(b, "names")))
    tokens = jax.random.randint(jax.random.key(3), (1, 9), 0, CFG.vocab_size)
    np.testing.assert_allclose(np.asarray(ij.forward(cfg, unrolled, tokens)),
                               np.asarray(ij.forward(CFG, params, tokens)), atol=1e-6)


@pytest.mark.parametrize("policy", ["full", "save_qkv_attn", "minimal"])
def test_remat_policies_keep_gradients(params, policy):
    tokens = jax.random.randint(jax.random.key(4), (1, 8), 0, CFG.vocab_size)

    def loss(cfg, p):
        return jnp.mean(jax.nn.log_softmax(ij.forward(cfg, p, tokens))[..., 0])

    ref = jax.grad(lambda p: loss(CFG, p))(params)
    got = jax.grad(lambda p: loss(dataclasses.replace(CFG, remat_policy=policy), p))(params)
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_bf16_compute_close_to_fp32(params):
    tokens = jax.random.randint(jax.random.key(5), (1, 12), 0, CFG.vocab_size)
    ref = np.asarray(ij.forward(CFG, params, tokens))
    bf = ij.forward(dataclasses.replace(CFG, dtype=jnp.bfloat16), params, tokens)
    assert bf.dtype == jnp.float32  # logits are returned in fp32
    assert np.abs(np.asarray(bf) - ref).max() < 0.05 * np.abs(ref).max() + 0.05


def test_params_carry_logical_axes(params):
    spec = ij.model.logical_axes(params)
    assert tuple(spec["layers"]["attention"]["wqkv"]) == ("layers", "embed", "kv_heads", "qkv_group", "head_dim")
    assert tuple(spec["tok_embeddings"]) == ("vocab", "embed")
    assert tuple(spec["output"]) == ("embed", "vocab")


def test_bad_token_shape_is_rejected(params):
    with pytest.raises(AssertionError, match="rank"):
        ij.forward(CFG, params, jnp.zeros((4,), jnp.int32))


@pytest.mark.parametrize("cache_block", [None, 16])
def test_chunked_prefill_equals_the_whole_prompt_at_once(params, monkeypatch, cache_block):
    """`prefill_last` in chunks: the next-token logits equal the full forward's at each ragged prompt's end, the
    cache equals the unchunked prefill's, and decoding after it equals decoding after a normal prefill. With
    `cache_block` 16 the chunks read the cache blockwise (online softmax; 60 positions: the last block shifted)."""
    from internlm2_jax.layers import attention_core
    if cache_block:
        monkeypatch.setattr(attention_core, "CACHE_BLOCK", cache_block)
    tokens = np.asarray(jax.random.randint(jax.random.key(4), (2, 56), 0, CFG.vocab_size))
    lengths = np.array([23, 56])
    padded = tokens.copy()
    padded[0, 23:] = 0
    full = [np.asarray(ij.forward(CFG, params, jnp.asarray(tokens[r:r + 1, :n])))[0] for r, n in enumerate(lengths)]
    _, ref_cache = ij.prefill(CFG, params, jnp.asarray(padded), max_len=60, lengths=jnp.asarray(lengths))
    for chunk in (7, 16, 56):
        last, cache = jax.jit(lambda t, c=chunk: ij.model.prefill_last(
            CFG, params, t, max_len=60, lengths=jnp.asarray(lengths), chunk=c))(jnp.asarray(padded))
        for r, n in enumerate(lengths):
            np.testing.assert_allclose(np.asarray(last[r]), full[r][n - 1], atol=2e-5)
            for name in ("k", "v"):
                np.testing.assert_allclose(np.asarray(cache[name][:, r, :n]), np.asarray(ref_cache[name][:, r, :n]),
                                           atol=2e-5)
        nxt = jnp.asarray([tokens[0, 23], tokens[1, 0]])
        a, _ = ij.decode_step(CFG, params, cache, nxt)
        b, _ = ij.decode_step(CFG, params, ref_cache, nxt)
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5)


def test_chunked_prefill_memory_does_not_grow_with_the_square_of_the_prompt(params):
    """Compiled temporaries of a 4096-token prefill: in 256-token chunks (cache read in blocks) vs all at once."""
    tokens = jax.ShapeDtypeStruct((1, 4096), jnp.int32)

    def temp_bytes(chunk):
        fn = jax.jit(lambda p, t: ij.model.prefill_last(CFG, p, t, max_len=4096, chunk=chunk))
        return fn.lower(params, tokens).compile().memory_analysis().temp_size_in_bytes

    whole, chunked = temp_bytes(None), temp_bytes(256)
    assert chunked < 0.1 * whole, (chunked, whole)
