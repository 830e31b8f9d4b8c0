"""Under 8 fake devices: a checkpoint written on data=8 restores onto fsdp=4 x tensor=2 with equal loss."""

import os
import sys
import tempfile

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402

from internlm2_jax.checkpointing import CheckpointConfig, Checkpointer  # noqa: E402
from internlm2_jax.config import get_preset  # noqa: E402
from internlm2_jax.sharding import MeshConfig, make_mesh, shard_shapes  # noqa: E402
from internlm2_jax.train.optimizer import OptimizerConfig, make_optimizer  # noqa: E402
from internlm2_jax.train.causal_lm import StepConfig, causal_lm_trainer  # noqa: E402

cfg = get_preset("tiny", dtype="float32")
tx = make_optimizer(OptimizerConfig(peak_lr=1e-2, warmup_steps=1))
batch = {"tokens": np.random.default_rng(0).integers(0, cfg.vocab_size, (8, 16)).astype(np.int32)}
workdir = tempfile.mkdtemp() if len(sys.argv) < 2 else sys.argv[1]

a = causal_lm_trainer(cfg, tx, make_mesh(MeshConfig(data=8)), StepConfig(loss_chunk=8))
state = a.init_state(jax.random.key(0))
state, _ = a.step(state, batch)
jax.block_until_ready(state)
loss_a = float(a.eval_loss(state.params, batch)["loss_sum"])
ckpt = Checkpointer(workdir, CheckpointConfig(async_save=False))
ckpt.save(1, state, meta={"note": "data=8"})
ckpt.close()

b = causal_lm_trainer(cfg, tx, make_mesh(MeshConfig(data=1, fsdp=4, tensor=2)), StepConfig(loss_chunk=8))
ckpt = Checkpointer(workdir)
step, restored, meta = ckpt.restore(b.abstract_state())
ckpt.close()
assert step == 1 and meta == {"note": "data=8"}
wqkv_a = shard_shapes(state.params)["layers"]["attention"]["wqkv"]
wqkv_b = shard_shapes(restored.params)["layers"]["attention"]["wqkv"]
assert wqkv_a == (2, 64, 2, 4, 16) and wqkv_b == (2, 16, 1, 4, 16), (wqkv_a, wqkv_b)
loss_b = float(jax.block_until_ready(b.eval_loss(restored.params, batch))["loss_sum"])
assert abs(loss_a - loss_b) <= 1e-5 * abs(loss_a), (loss_a, loss_b)
restored, metrics = b.step(restored, batch)  # and training continues on the new mesh
jax.block_until_ready(metrics)
print("RESHARD OK", loss_a, loss_b)
