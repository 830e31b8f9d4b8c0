"""Run under 8 fake CPU devices: LoraTrainer (plain and int4 QLoRA) on data=2 x fsdp=2 x tensor=2.

Checks the per-device shard shapes of adapters, optimizer state and base (the logical axes of
`lora_trainer.adapter_logical_axes` / `quantized_logical_axes`), and that the loss of two steps equals the
1-device run's (rel 1e-5), with the same updated adapters. Each step is blocked on (2-core CI: XLA's CPU
collectives can deadlock when many sharded steps are queued).
"""

import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from internlm2_jax.config import get_preset  # noqa: E402
from internlm2_jax.model import init_params  # noqa: E402
from internlm2_jax.sft.lora import LoraConfig  # noqa: E402
from internlm2_jax.sft.lora_trainer import LoraTrainer  # noqa: E402
from internlm2_jax.sharding import MeshConfig, make_mesh, shard_shapes  # noqa: E402

assert jax.device_count() == 8
cfg = get_preset("tiny", dtype="float32", num_key_value_heads=2, num_attention_heads=4, vocab_size=512)
R = 4
lora = LoraConfig(rank=R, alpha=8.0)
base = jax.device_get(nn.meta.unbox(jax.jit(lambda k: init_params(cfg, k))(jax.random.key(0))))
rng = np.random.default_rng(0)
tokens = rng.integers(3, cfg.vocab_size, (8, 16)).astype(np.int32)
segs = np.repeat(np.array([[1] * 10 + [2] * 6]), 8, axis=0).astype(np.int32)
pos = np.concatenate([np.arange(10), np.arange(6)])[None].repeat(8, 0).astype(np.int32)
batch = {"tokens": tokens, "segment_ids": segs, "positions": pos, "loss_mask": np.ones_like(tokens)}

# d2f2t2 shard shapes: embed (64) / fsdp 2, mlp (176) kv_heads (2) heads (4) / tensor 2, layers unsharded.
ADAPTER_SHARDS = {
    ("attention", "wqkv"): {"a": (2, 32, R), "b": (2, R, 1, 4, 16)},
    ("attention", "wo"): {"a": (2, 32, R), "b": (2, R, 32)},  # A's in = heads·head_dim, split like heads
    ("feed_forward", "w1"): {"a": (2, 32, R), "b": (2, R, 88)},
    ("feed_forward", "w2"): {"a": (2, 88, R), "b": (2, R, 32)},
}
BASE_SHARDS = {
    None: {("attention", "wqkv"): (2, 32, 1, 4, 16), ("attention", "wo"): (2, 2, 16, 32),
           ("feed_forward", "w2"): (2, 88, 32)},
    # packed q: the last input dim halved (and still sharded); scales: None on that dim
    "int4": {("attention", "wqkv"): ((2, 16, 1, 4, 16), (2, 1, 1, 4, 16)),
             ("attention", "wo"): ((2, 2, 8, 32), (2, 2, 1, 32)),
             ("feed_forward", "w2"): ((2, 44, 32), (2, 4, 32))},
}


def run(mesh_cfg, devices, quantize):
    trainer = LoraTrainer(cfg, optax.sgd(0.5), make_mesh(mesh_cfg, devices), lora, quantize=quantize)
    trainer.set_base(base)
    state = trainer.init_state(jax.random.key(1))
    jax.block_until_ready(state)
    losses = []
    for _ in range(2):
        state, metrics = trainer.step(state, batch)
        losses.append(float(jax.block_until_ready(metrics)["loss"]))
        assert bool(metrics["finite"])
    return trainer, state, losses


for quantize in (None, "int4"):
    ref_trainer, ref_state, ref_losses = run(MeshConfig(data=1), jax.devices()[:1], quantize)
    trainer, state, losses = run(MeshConfig(data=2, fsdp=2, tensor=2), None, quantize)
    assert dict(trainer.mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2, "sequence": 1}

    ads = shard_shapes(state.params)["layers"]
    for (group, name), want in ADAPTER_SHARDS.items():
        assert ads[group][name] == want, (group, name, ads[group][name], want)
    # The optimizer state's adapter-shaped leaves are sharded like the adapters.
    for path, leaf in jax.tree_util.tree_leaves_with_path(state.opt_state):
        keys = [getattr(k, "key", None) for k in path]
        if "wqkv" in keys and keys[-1] == "a":
            assert leaf.addressable_shards[0].data.shape == (2, 32, R), path
    base_shards = shard_shapes(trainer.base)["layers"]
    for (group, name), want in BASE_SHARDS[quantize].items():
        got = base_shards[group][name]
        got = (got.q, got.scale) if quantize else got
        assert got == want, (quantize, group, name, got, want)
    if quantize:  # quantization is sharding-independent: the same packed bytes as on one device
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                     trainer.base, ref_trainer.base)

    assert losses[1] != losses[0]
    for got, want in zip(losses, ref_losses):
        assert abs(got - want) <= 1e-5 * abs(want), (quantize, losses, ref_losses)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref_state.params)):
        a, b = np.asarray(a), np.asarray(b)
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(b).max(), err_msg=str(quantize))
    print(quantize or "lora", "ok", losses, flush=True)
print("LORA SHARDED OK")
