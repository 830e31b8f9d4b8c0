"""Run under 8 fake CPU devices: loss/grads equal across meshes; shards really split."""

import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402

from internlm2_jax.config import get_preset  # noqa: E402
from internlm2_jax.sharding import MeshConfig, make_mesh, shard_shapes  # noqa: E402
from internlm2_jax.train.optimizer import OptimizerConfig, make_optimizer  # noqa: E402
from internlm2_jax.train.causal_lm import StepConfig, causal_lm_trainer, loss_and_grads
from internlm2_jax.train.trainer import mesh_context  # noqa: E402
from same_as_reference import same_as_reference  # noqa: E402 (tests/workers/)

assert jax.device_count() == 8
cfg = get_preset("tiny", dtype="float32", num_key_value_heads=2, num_attention_heads=4, vocab_size=512)
rng = np.random.default_rng(0)
tokens = rng.integers(0, cfg.vocab_size, (8, 16)).astype(np.int32)
segs = np.repeat(np.array([[1] * 10 + [2] * 6]), 8, axis=0).astype(np.int32)
pos = np.concatenate([np.arange(10), np.arange(6)])[None].repeat(8, 0).astype(np.int32)
batch = {"tokens": tokens, "segment_ids": segs, "positions": pos}
tx = make_optimizer(OptimizerConfig(peak_lr=1e-3, warmup_steps=1))

ref = None
meshes = {
    "single": MeshConfig(data=1), "data8": MeshConfig(data=8), "fsdp8": MeshConfig(data=1, fsdp=8),
    "d2f2t2": MeshConfig(data=2, fsdp=2, tensor=2), "tensor2": MeshConfig(data=4, tensor=2),
    "sequence2": MeshConfig(data=4, sequence=2),
}
for name, mc in meshes.items():
    devices = jax.devices()[:1] if name == "single" else None
    mesh = make_mesh(mc, devices)
    trainer = causal_lm_trainer(cfg, tx, mesh, StepConfig(grad_accum=2, loss_chunk=8))
    state = trainer.init_state(jax.random.key(0))
    shapes = shard_shapes(state.params)
    wqkv = shapes["layers"]["attention"]["wqkv"]  # [layers, embed, kv_heads, G+2, head_dim]
    if name == "fsdp8":
        assert wqkv == (2, 64 // 8, 2, 4, 16), wqkv
        assert shapes["tok_embeddings"] == (512, 8), shapes["tok_embeddings"]
    if name in ("tensor2", "d2f2t2"):
        assert wqkv[2] == 1, wqkv  # one whole kv group per tensor shard
        assert shapes["layers"]["feed_forward"]["w1"][2] == cfg.intermediate_size // 2
        assert shapes["output"][1] == cfg.vocab_size // 2
    if name == "data8":
        assert wqkv == (2, 64, 2, 4, 16)
    fn = jax.jit(lambda p, b: loss_and_grads(cfg, p, b, StepConfig(grad_accum=2, loss_chunk=8))[:2])
    with mesh_context(mesh):
        loss, grads = jax.block_until_ready(fn(state.params, batch))
    ref = same_as_reference(name, loss, grads, ref)
    if name in ("single", "d2f2t2"):  # the full jitted step (donation, optimizer) on a mixed mesh too
        state, metrics = trainer.step(state, batch)
        jax.block_until_ready(metrics)
        assert abs(float(metrics["loss"]) - ref[0]) <= 1e-5 * ref[0], name
    print(name, "ok", loss, flush=True)

# Bad meshes fail with one clear message.
for mc, msg in [(MeshConfig(data=1, tensor=3), "but 8 are available"), (MeshConfig(data=2, tensor=4),
                                                                  "num_key_value_heads=2 is not divisible")]:
    try:
        causal_lm_trainer(cfg, tx, make_mesh(mc), StepConfig())
    except ValueError as e:
        assert msg in str(e), str(e)
        print("error ok:", e)
    else:
        raise AssertionError(f"{mc} should fail")
print("ALL OK")
