"""One process of a 2-process data-parallel run on loopback, or the single-process reference.

    python two_process.py PORT PROCESS_ID      # process PROCESS_ID of 2, 2 CPU devices each
    python two_process.py 0 single             # 1 process, 4 CPU devices, full batch

Prints `LOSSES <l0> <l1> <l2>` (three steps). Each of the two processes loads HALF of the fixed
global batch (`local_batch_slice`) and `host_local_to_global` assembles the global array.
"""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"
port, who = sys.argv[1], sys.argv[2]
if who == "single":
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"

import jax
import numpy as np

from internlm2_jax import distributed
from internlm2_jax.config import get_preset
from internlm2_jax.sharding import MeshConfig, host_local_to_global, make_mesh
from internlm2_jax.train.optimizer import OptimizerConfig, make_optimizer
from internlm2_jax.train.causal_lm import StepConfig, causal_lm_trainer

if who != "single":
    plan = distributed.initialize(f"127.0.0.1:{port}", 2, int(who), timeout_s=60)
    assert plan.source == "explicit", plan
    assert jax.process_count() == 2 and jax.device_count() == 4 and jax.local_device_count() == 2

cfg = get_preset("tiny", dtype="float32")
rng = np.random.default_rng(0)
B, S = 8, 16
batch = {"tokens": rng.integers(0, cfg.vocab_size, (B, S)).astype(np.int32),
         "loss_mask": (rng.random((B, S)) > 0.2).astype(np.int32)}
mesh = make_mesh(MeshConfig(data=-1))  # data axis over all 4 devices of both processes
rows = distributed.local_batch_slice(B)
local = {k: v[rows] for k, v in batch.items()}
assert local["tokens"].shape[0] == (B if who == "single" else B // 2)

trainer = causal_lm_trainer(cfg, make_optimizer(OptimizerConfig(peak_lr=1e-2, warmup_steps=1)), mesh,
                  StepConfig(loss_chunk=8))
state = trainer.init_state(jax.random.key(0))
losses = []
for _ in range(3):
    state, metrics = trainer.step(state, host_local_to_global(local, mesh))
    losses.append(float(jax.block_until_ready(metrics["loss"])))
print("LOSSES " + " ".join(f"{x:.8f}" for x in losses), flush=True)
