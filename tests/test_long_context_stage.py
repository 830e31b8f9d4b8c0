"""The stage 1 -> stage 2 (long context) transition in miniature: `stage2_tiny.gin` restores a 256-token run's
params, raises the RoPE base and trains on 2048-token sequences split over `sequence`=4 (8 fake devices)."""

import math
import os
import subprocess
import sys

from internlm2_jax.train.metrics_log import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEST_GIN = os.path.join(ROOT, "tests", "configs", "pretrain_test.gin")
STAGE2 = os.path.join(ROOT, "experiments", "configs", "pretrain", "stage2_tiny.gin")


def _pretrain(workdir, gins, bindings, **env):
    cmd = [sys.executable, "-m", "experiments.pretrain", "--workdir", str(workdir)]
    for g in gins:
        cmd += ["--gin", g]
    for b in bindings:
        cmd += ["--gin_param", b]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": ROOT, **env})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return [r for r in read_metrics(str(workdir)) if "loss" in r]


def test_stage2_restores_stage1_and_trains_2048_tokens_with_the_sequence_split(tmp_path):
    s1 = _pretrain(tmp_path / "s1", [TEST_GIN], ["InputConfig.seq_len = 256", "model_config.max_position_embeddings = 256",
                                                 "model_config.rope_theta = 50000.0", "train.num_steps = 6"])
    s2 = _pretrain(tmp_path / "s2", [TEST_GIN, STAGE2],
                   [f"PREVIOUS_STAGE_WORKDIR = '{tmp_path / 's1'}'", "train.num_steps = 2", "train.eval_every = 1000",
                    "train.checkpoint_every = 2"],
                   XLA_FLAGS="--xla_force_host_platform_device_count=8")
    chance = math.log(512)  # the test model's vocabulary: a fresh model starts at ~ln V (6.24)
    assert s1[0]["loss"] > chance - 0.2
    assert [r["step"] for r in s2] == [1, 2]
    # Stage 2 starts where stage 1 ended (~5.3 after its 6 steps), not from scratch, despite the new RoPE base.
    assert s2[0]["loss"] < chance - 0.4, (s1[-1], s2[0])
    assert all(math.isfinite(r["loss"]) for r in s2)
