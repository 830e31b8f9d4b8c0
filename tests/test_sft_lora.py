"""LoRA: only adapters train (base bit-identical), merged params = base + adapters, int8 base."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from internlm2_jax import forward, get_preset, init_params
from internlm2_jax.sft.lora import (LoraConfig, QuantizedWeight, apply_lora, init_lora, make_lora_step, merge_lora,
                                    quantize_int8)

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
