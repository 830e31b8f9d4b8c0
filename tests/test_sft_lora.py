"""LoRA: only adapters train (base bit-identical), merged params = base + adapters, int8 / int4 bases."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from internlm2_jax import forward, get_preset, init_params
from internlm2_jax.sft.lora import (LoraConfig, QuantizedWeight, apply_lora, init_lora, merge_lora,
                                    quantize_int8)
from internlm2_jax.sft.quantize import Int4Weight, int4_axis, quantize_base, quantize_int4, quantize_int4_weight
from internlm2_jax.sft.lora_trainer import make_lora_step

CFG = get_preset("tiny", dtype="float32")


@pytest.fixture(scope="module")
def base():
    return nn.meta.unbox(jax.jit(lambda k: init_params(CFG, k))(jax.random.key(0)))


def _batch():
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, 500, (2, 16)).astype(np.int32)
    return {"tokens": tokens, "segment_ids": np.ones_like(tokens), "positions": np.tile(np.arange(16), (2, 1)),
            "loss_mask": np.ones_like(tokens)}


def test_only_adapters_train_and_merge_matches(base):
    base_copy = jax.tree.map(np.array, base)
    cfg = LoraConfig(rank=4, alpha=8.0, dropout=0.1)
    ads = init_lora(base, cfg, jax.random.key(1))
    wqkv = base["layers"]["attention"]["wqkv"]
    assert ads["layers"]["attention"]["wqkv"]["a"].shape == (2, 64, 4)
    assert ads["layers"]["attention"]["wqkv"]["b"].shape == (2, 4) + wqkv.shape[2:]
    assert ads["layers"]["attention"]["wo"]["a"].shape == (2, 64, 4)
    tx = optax.adam(1e-2)
    step = make_lora_step(CFG, tx, cfg)
    opt = tx.init(ads)
    losses = []
    for i in range(3):
        ads, opt, m = step(ads, opt, base, _batch(), jax.random.key(i))
        losses.append(float(m["loss"]))
    assert losses[-1] < losses[0]
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), base, base_copy)
    assert float(jnp.abs(ads["layers"]["feed_forward"]["w2"]["b"]).max()) > 0
    merged = merge_lora(base, ads, cfg)
    tokens = jnp.asarray(_batch()["tokens"])
    fwd = jax.jit(lambda p: forward(CFG, p, tokens))
    assert not np.allclose(fwd(merged), fwd(base))
    # Reference: per-layer x @ W + s · (x @ A) @ B for one projection, checked directly.
    a, b = ads["layers"]["feed_forward"]["w1"]["a"][0], ads["layers"]["feed_forward"]["w1"]["b"][0]
    x = jax.random.normal(jax.random.key(5), (3, 64))
    np.testing.assert_allclose(x @ merged["layers"]["feed_forward"]["w1"][0],
                               x @ base["layers"]["feed_forward"]["w1"][0] + cfg.scale * (x @ a) @ b, atol=1e-5)


def test_int8_base(base):
    qbase = jax.jit(quantize_int8)(base)
    w = qbase["layers"]["feed_forward"]["w1"]
    assert isinstance(w, QuantizedWeight) and w.q.dtype == jnp.int8
    deq = w.dequantize()
    orig = base["layers"]["feed_forward"]["w1"]
    assert float(jnp.abs(deq - orig).max()) <= float(w.scale.max()) / 2 + 1e-7
    cfg = LoraConfig(rank=2)
    ads = jax.jit(lambda q: init_lora(q, cfg, jax.random.key(1)))(qbase)
    merged = jax.jit(lambda q, a: apply_lora(q, a, cfg.alpha, cfg.rank))(qbase, ads)  # B = 0: = dequantized
    np.testing.assert_array_equal(merged["layers"]["feed_forward"]["w1"], deq)
    np.testing.assert_array_equal(merged["tok_embeddings"], base["tok_embeddings"])
    # QLoRA step: trains through the dequantized int8 base, which stays untouched.
    q_before = np.array(w.q)
    tx = optax.sgd(1e-2)
    new_ads, _, m = make_lora_step(CFG, tx, cfg)(ads, tx.init(ads), qbase, _batch(), jax.random.key(0))
    assert np.isfinite(float(m["loss"])) and float(jnp.abs(new_ads["layers"]["attention"]["wo"]["b"]).max()) > 0
    np.testing.assert_array_equal(qbase["layers"]["feed_forward"]["w1"].q, q_before)


def test_int4_packing_by_hand():
    # One block of 4: scale = bf16(0.7 / 7) = 0.10009765625; q = round(w / scale) = [7, -3, 1, 0];
    # nibbles q + 8 = [15, 5, 9, 8]; bytes = lo | hi << 4 = [15 + 5·16, 9 + 8·16] = [95, 137].
    qw = quantize_int4_weight(jnp.asarray([[0.7, -0.35, 0.1, 0.0]], jnp.float32), axis=1, block=4)
    assert qw.q.dtype == jnp.uint8 and qw.scale.dtype == jnp.bfloat16 and qw.shape == (1, 4) and qw.block == 4
    np.testing.assert_array_equal(np.asarray(qw.q), [[95, 137]])
    s = 0.10009765625
    assert float(qw.scale[0, 0]) == s
    np.testing.assert_array_equal(np.asarray(qw.dequantize()), np.float32([[7 * s, -3 * s, s, 0.0]]))
    with pytest.raises(ValueError, match="4 or 8"):
        LoraConfig(qlora_bits=2)
    with pytest.raises(ValueError, match="4 or 8"):
        quantize_base({}, ("w1",), 3)


def test_int4_error_bound_and_bytes(base):
    qbase = jax.jit(quantize_int4)(base)
    assert qbase["tok_embeddings"].dtype == jnp.float32  # non-targets untouched
    for group, name in [("attention", "wqkv"), ("attention", "wo"), ("feed_forward", "w1"),
                        ("feed_forward", "w2"), ("feed_forward", "w3")]:
        w, qw = np.asarray(base["layers"][group][name]), qbase["layers"][group][name]
        assert isinstance(qw, Int4Weight) and qw.q.dtype == jnp.uint8 and qw.shape == w.shape
        ax = int4_axis(name, w.ndim)
        n, bs = w.shape[ax], qw.block
        assert bs == (64 if n % 64 == 0 else {16: 16, 176: 44}[n])  # head_dim 16, intermediate 176
        # Hand-computed scales: bf16(absmax over each block of `bs` along the last input dim / 7).
        blocks = w.reshape(*w.shape[:ax], n // bs, bs, *w.shape[ax + 1:])
        absmax = np.abs(blocks).max(axis=ax + 1)
        np.testing.assert_array_equal(np.asarray(qw.scale), (absmax / 7).astype(jnp.bfloat16))
        # Round-to-nearest error: |w - deq| <= scale / 2 elementwise, and scale <= absmax/7 · (1 + 2^-8).
        scale = np.repeat(np.asarray(qw.scale, np.float32), bs, axis=ax)
        err = np.abs(np.asarray(qw.dequantize()) - w)
        assert np.all(err <= scale / 2 * (1 + 1e-6) + 1e-12), (name, float((err / scale).max()))
        assert np.all(err <= np.repeat(absmax, bs, axis=ax) / 14 * (1 + 2 ** -8) + 1e-12)
        # Memory: 0.5 byte / weight packed + one bf16 per block.
        assert qw.q.nbytes == w.size // 2 and qw.scale.nbytes == 2 * w.size // bs
    w1 = qbase["layers"]["feed_forward"]["w1"]
    assert (w1.q.nbytes + w1.scale.nbytes) / w1.q.size / 2 == 0.5 + 2 / 64  # 0.53 byte / weight (f32: 4)


def test_int4_qlora_step_trains_only_adapters(base):
    qbase = jax.jit(lambda p: quantize_base(p, LoraConfig().targets, LoraConfig().qlora_bits))(base)
    assert isinstance(qbase["layers"]["attention"]["wqkv"], Int4Weight)  # qlora default = int4
    frozen = jax.tree.map(np.array, qbase)
    cfg = LoraConfig(rank=4, alpha=8.0)
    ads = jax.jit(lambda q: init_lora(q, cfg, jax.random.key(1)))(qbase)
    assert ads["layers"]["attention"]["wqkv"]["a"].shape == (2, 64, 4)
    merged = jax.jit(lambda q, a: apply_lora(q, a, cfg.alpha, cfg.rank))(qbase, ads)  # B = 0: = dequantized
    np.testing.assert_array_equal(merged["layers"]["attention"]["wo"], qbase["layers"]["attention"]["wo"].dequantize())
    tx = optax.adam(1e-2)
    step, opt = make_lora_step(CFG, tx, cfg), tx.init(ads)
    losses = []
    for i in range(3):
        ads, opt, m = step(ads, opt, qbase, _batch(), jax.random.key(i))
        losses.append(float(m["loss"]))
    assert losses[-1] < losses[0]
    assert float(jnp.abs(ads["layers"]["feed_forward"]["w2"]["b"]).max()) > 0
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), qbase, frozen)  # q and scales
