"""Every post-training stage runs in the one training loop: killed with SIGKILL part-way and started again on the
same workdir, it logs exactly the metrics of the uninterrupted run (timings aside) and ends with the same params.

(Pretraining and full SFT have the same check in test_pretrain.py / test_sft_train.py.)
"""

import importlib
import os
import re
import signal
import subprocess
import sys
import time

import gin
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from internlm2_jax.train.metrics_log import read_metrics

ROOT = os.path.dirname(os.path.dirname(__file__))
RLHF = os.path.join(ROOT, "experiments", "configs", "rlhf")
TIMING = re.compile(r"time|per_s|wall")

# stage: (entry point, gin file, the stage's gin function, bindings). Checkpoints every 2 steps, written
# synchronously so the kill (once step 3 is logged) always finds step 2 committed and the rerun really resumes.
STAGES = {
    "reward_model": ("experiments.reward_model", os.path.join(RLHF, "rm_tiny.gin"), "train_rm",
                     ["train_rm.data = ['toy:64']", "train_rm.epochs = 1"]),
    "dpo": ("experiments.dpo", os.path.join(RLHF, "dpo_tiny.gin"), "train_dpo",
            ["train_dpo.data = ['toy:64']", "train_dpo.epochs = 2"]),
    "ppo": ("experiments.ppo", os.path.join(RLHF, "ppo_tiny.gin"), "train_ppo",
            ["train_ppo.iterations = 6", "RLConfig.critic_warmup_iters = 2", "RLConfig.batch_size = 8",
             "RLConfig.num_minibatches = 2", "train_ppo.num_prompts = 32"]),
    "grpo": ("experiments.ppo", os.path.join(RLHF, "grpo_tiny.gin"), "train_ppo",
             ["train_ppo.iterations = 5", "train_ppo.num_prompts = 32"]),
    "sft_lora": ("experiments.sft", os.path.join(ROOT, "tests", "configs", "sft_test.gin"), "sft_train",
                 ["sft_train.mode = 'lora'", "sft_train.num_steps = 6", "sft_train.log_every = 1",
                  "sft_train.task_sizes = (200, 8)"]),
}
KILL_AT = 3


def _args(stage: str, workdir) -> list[str]:
    _, gin_file, fn, bindings = STAGES[stage]
    args = ["--gin", gin_file, "--workdir", str(workdir)]
    for b in bindings + [f"{fn}.checkpoint_every = 2", f"{fn}.checkpoint = @CheckpointConfig()",
                         "CheckpointConfig.async_save = False"]:
        args += ["--gin_param", b]
    return args


def _cmd(stage: str, workdir) -> list[str]:
    return [sys.executable, "-m", STAGES[stage][0], *_args(stage, workdir)]


def _run(stage: str, workdir) -> None:
    """The stage's CLI in this process (the uninterrupted reference and the resumed run: compiled once)."""
    gin.clear_config()
    assert importlib.import_module(STAGES[stage][0]).main(_args(stage, workdir)) == 0


def _run_and_kill(stage: str, workdir, at_step: int) -> None:
    proc = subprocess.Popen(_cmd(stage, workdir), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    path = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + 400
    try:
        while time.time() < deadline and proc.poll() is None:
            if os.path.exists(path) and any(r.get("step", 0) >= at_step for r in read_metrics(str(workdir))):
                break
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert any(r.get("step", 0) >= at_step for r in read_metrics(str(workdir))), f"never reached step {at_step}"


def _rows(workdir) -> list[dict]:
    return [{k: v for k, v in r.items() if not TIMING.search(k)} for r in read_metrics(str(workdir))]


def _final_state(workdir, step: int):
    return ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", str(step), "state"))


@pytest.mark.parametrize("stage", [
    "reward_model", "ppo", pytest.param("dpo", marks=pytest.mark.slow), pytest.param("grpo", marks=pytest.mark.slow),
    pytest.param("sft_lora", marks=pytest.mark.slow)])
def test_resume_after_sigkill_reproduces_the_uninterrupted_run(stage, tmp_path):
    ref, work = tmp_path / "ref", tmp_path / "work"
    _run(stage, ref)
    steps = max(r["step"] for r in _rows(ref))
    assert steps > KILL_AT + 1
    _run_and_kill(stage, work, KILL_AT)
    assert max(r.get("step", 0) for r in read_metrics(str(work))) < steps, "the run finished before the kill"
    assert os.path.isdir(work / "checkpoints" / "2")
    _run(stage, work)  # same workdir: resumes from the newest complete checkpoint
    assert _rows(work) == _rows(ref)
    a, b = _final_state(work, steps), _final_state(ref, steps)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes()
