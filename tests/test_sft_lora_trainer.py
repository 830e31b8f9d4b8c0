"""LoraTrainer under a 1-device mesh: adapter shardings from the base axes, only adapters change, QLoRA
(int8 / int4), and merged HF export (save_hf → load_hf) reproduces base + adapters logits. On 8 fake devices
(subprocess, `workers/lora_sharded.py`): shards split as the logical axes say, loss = the 1-device loss."""

import os
import subprocess
import sys


import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from internlm2_jax import forward, get_preset, init_params
from internlm2_jax.hf_io import load_hf, save_hf
from internlm2_jax.sft.lora import LoraConfig, QuantizedWeight, apply_lora
from internlm2_jax.sft.quantize import Int4Weight
from internlm2_jax.sft.lora_trainer import LoraTrainer, adapter_logical_axes
from internlm2_jax.sharding import MeshConfig, make_mesh

CFG = get_preset("tiny", dtype="float32")
LORA = LoraConfig(rank=4, alpha=8.0)


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, 500, (2, 16)).astype(np.int32)
    return {"tokens": tokens, "segment_ids": np.ones_like(tokens), "positions": np.tile(np.arange(16), (2, 1)),
            "loss_mask": np.ones_like(tokens)}


@pytest.fixture(scope="module")
def base():
    return nn.meta.unbox(jax.jit(lambda k: init_params(CFG, k))(jax.random.key(0)))


def test_adapter_axes_follow_base():
    specs = adapter_logical_axes({"layers": {"attention": {
        "wqkv": P("layers", "embed", "kv_heads", "qkv_group", "head_dim"),
        "wo": P("layers", "heads", "head_dim", "embed")},
        "attention_norm": {"scale": P("layers", "norm")}}, "output": P("embed", "vocab")}, LORA.targets)
    assert specs == {"layers": {"attention": {
        "wqkv": {"a": P("layers", "embed", None), "b": P("layers", None, "kv_heads", "qkv_group", "head_dim")},
        "wo": {"a": P("layers", "heads", None), "b": P("layers", None, "embed")}}}}


@pytest.mark.parametrize("quantize", [None, "int8", "int4"])
def test_only_adapters_change_and_merged_export_matches(base, quantize, tmp_path):
    mesh = make_mesh(MeshConfig(data=1), jax.devices()[:1])
    trainer = LoraTrainer(CFG, optax.adam(1e-2), mesh, LORA, quantize=quantize)
    trainer.set_base(base)
    frozen = jax.tree.map(np.array, trainer.base)
    if quantize:
        kind = {"int8": QuantizedWeight, "int4": Int4Weight}[quantize]
        assert isinstance(trainer.base["layers"]["feed_forward"]["w1"], kind)
        assert isinstance(trainer.base["layers"]["attention"]["wqkv"], kind)
    state = trainer.init_state(jax.random.key(1))
    abstract = trainer.abstract_state()
    assert jax.tree.structure(abstract.params) == jax.tree.structure(state.params)
    assert "tok_embeddings" not in state.params  # checkpoints hold adapters + optimizer only
    losses = []
    for i in range(4):
        state, m = trainer.step(state, _batch())
        losses.append(float(m["loss"]))
        assert bool(m["finite"]) and {"accuracy", "grad_norm", "tokens", "skipped"} <= set(m)
    assert losses[-1] < losses[0]
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), trainer.base, frozen)
    assert float(jnp.abs(state.params["layers"]["feed_forward"]["w2"]["b"]).max()) > 0
    sums = trainer.eval_loss(state.params, _batch())
    assert float(sums["count"]) == 2 * 15

    merged = jax.device_get(trainer.merged_params(state.params))
    save_hf(CFG, merged, tmp_path / "hf")
    cfg2, loaded = load_hf(tmp_path / "hf", dtype="float32")
    tokens = jnp.asarray(_batch(1)["tokens"])
    merged_fwd = jax.jit(lambda b, a: forward(CFG, apply_lora(b, a, LORA.alpha, LORA.rank), tokens))
    ref = merged_fwd(trainer.base, state.params)
    np.testing.assert_allclose(np.asarray(forward(cfg2, loaded, tokens)), np.asarray(ref), atol=2e-5, rtol=2e-5)
    assert not np.allclose(np.asarray(forward(CFG, base, tokens)), np.asarray(ref), atol=1e-4)


def test_bad_quantize_mode():
    with pytest.raises(ValueError, match="quantize must be"):
        LoraTrainer(CFG, optax.adam(1e-2), make_mesh(MeshConfig(data=1), jax.devices()[:1]), LORA, quantize="nf4")


def test_sharded_adapters_on_8_devices():
    """data=2 x fsdp=2 x tensor=2: per-device shard shapes of adapters / base (plain and int4), and loss after
    each of two steps = the 1-device loss (rel 1e-5)."""
    here = os.path.dirname(__file__)
    env = {**os.environ, "PYTHONPATH": os.path.dirname(here)}
    proc = subprocess.run([sys.executable, os.path.join(here, "workers", "lora_sharded.py")], capture_output=True,
                          text=True, timeout=400, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "LORA SHARDED OK" in proc.stdout
