"""Run under 8 fake CPU devices: context parallelism over `sequence` gives one device's loss and gradients.

    python tests/workers/context_parallel.py IMPL SEQ [--memory]

A packed batch of documents crossing the sequence slices' borders; meshes single, sequence=8,
fsdp=2 x sequence=4 and tensor=2 x sequence=4 (kv heads repeated); fp32, relative 1e-5. `--memory` instead only compiles the loss-and-gradients step at
SEQ with sequence=1 and sequence=8 and prints the temporary bytes per device.
"""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from internlm2_jax.config import get_preset  # noqa: E402
from internlm2_jax.model import init_params  # noqa: E402
from internlm2_jax.sharding import MeshConfig, make_mesh  # noqa: E402
from internlm2_jax.train.causal_lm import StepConfig, loss_and_grads  # noqa: E402
from internlm2_jax.train.trainer import mesh_context  # noqa: E402
from same_as_reference import same_as_reference  # noqa: E402 (tests/workers/)

impl, seq = sys.argv[1], int(sys.argv[2])
assert jax.device_count() == 8
cfg = get_preset("tiny", dtype="float32", hidden_size=256, intermediate_size=512, num_attention_heads=8,
                 num_key_value_heads=2, vocab_size=512, max_position_embeddings=max(seq, 2048),
                 attention_impl=impl, scan_unroll=1)  # the accelerators' rolled layer loop: their memory per device
rng = np.random.default_rng(0)
rows = 2
tokens = rng.integers(0, cfg.vocab_size, (rows, seq)).astype(np.int32)
segs, pos = np.zeros((rows, seq), np.int32), np.zeros((rows, seq), np.int32)
for r in range(rows):  # documents of random lengths, the last one padding (segment 0)
    at, doc = 0, 1
    while at < seq:
        n = min(int(rng.integers(seq // 16, seq // 3)), seq - at)
        segs[r, at:at + n] = doc if at + n < seq else 0
        pos[r, at:at + n] = np.arange(n)
        at, doc = at + n, doc + 1
batch = {"tokens": tokens, "segment_ids": segs, "positions": pos}
params = nn.meta.unbox(init_params(cfg, jax.random.key(0)))
step_cfg = StepConfig(grad_accum=1, loss_chunk=seq // 4)
fn = jax.jit(lambda p, b: loss_and_grads(cfg, p, b, step_cfg)[:2])

ref = None
meshes = {} if "--memory" in sys.argv else {"single": MeshConfig(data=1), "sequence8": MeshConfig(data=1, sequence=8),
                                           "f2s4": MeshConfig(data=1, fsdp=2, sequence=4),
                                           "t2s4": MeshConfig(data=1, tensor=2, sequence=4)}
for name, mc in meshes.items():
    mesh = make_mesh(mc, jax.devices()[:1] if name == "single" else None)
    on_mesh = jax.device_put((params, batch), NamedSharding(mesh, P()))  # the model's constraints shard them
    with mesh_context(mesh):
        loss, grads = jax.block_until_ready(fn(*on_mesh))
        if name != "single":  # the sequence split really is traded for a head split around attention
            assert "all-to-all" in fn.lower(*on_mesh).compile().as_text(), name
    ref = same_as_reference(name, loss, grads, ref, grad_atol=1e-5)
    print(name, "ok", loss, flush=True)

if "--memory" in sys.argv:
    spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
    temp = {}
    for s in (1, 8):
        mesh = make_mesh(MeshConfig(data=1, sequence=s), jax.devices()[:s])
        rep = NamedSharding(mesh, P())
        args = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), (params, spec))
        with mesh_context(mesh):
            compiled = fn.lower(*args).compile()
        temp[s] = compiled.memory_analysis().temp_size_in_bytes
    print(f"memory temp bytes per device: sequence=1 {temp[1]} sequence=8 {temp[8]} ratio {temp[8] / temp[1]:.3f}")
print("ALL OK")
