"""Multi-host: 2 processes on loopback (gloo CPU collectives) match a single-process run."""

import json
import os
import socket
import subprocess
import sys

import pytest

from internlm2_jax.distributed import LaunchPlan, local_batch_slice, resolve

HERE = os.path.dirname(__file__)
WORKER = os.path.join(HERE, "workers", "two_process.py")
PPO_WORKER = os.path.join(HERE, "workers", "two_process_ppo.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(out: str) -> list[float]:
    line = [l for l in out.splitlines() if l.startswith("LOSSES ")][-1]
    return [float(x) for x in line.split()[1:]]


def _run_pair(worker: str, timeout: int = 120) -> tuple[list[str], str]:
    """Outputs of the two loopback processes and of the single-process reference (each bounded by `timeout`)."""
    env = {**os.environ, "PYTHONPATH": os.path.dirname(HERE)}
    for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_JOB_ID"):
        env.pop(k, None)
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, worker, port, str(i)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env=env) for i in range(2)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-4000:]
    ref = subprocess.run([sys.executable, worker, "0", "single"], check=False, capture_output=True, text=True,
                         timeout=timeout, env=env)
    assert ref.returncode == 0, ref.stdout[-2000:] + ref.stderr[-4000:]
    return outs, ref.stdout


def test_two_processes_match_single_process():
    outs, ref = _run_pair(WORKER)
    expected = _losses(ref)
    assert expected[2] < expected[0]  # it trains
    for out in outs:
        assert _losses(out) == pytest.approx(expected, rel=1e-5)


@pytest.mark.slow
def test_ppo_iteration_on_two_processes_matches_one_process():
    """Rollout (generation replicated to every process), scoring, advantages, critic and actor minibatch updates with
    ptx batches fed half per process: the same metrics as one process holding the same 4-device mesh."""
    outs, ref = _run_pair(PPO_WORKER, timeout=300)

    def metrics(out: str) -> dict:
        return json.loads([line for line in out.splitlines() if line.startswith("METRICS ")][-1][len("METRICS "):])

    expected = metrics(ref)
    assert expected["pretrain_loss"] > 0 and expected["response_length"] > 0
    for out in outs:
        got = metrics(out)
        assert got == pytest.approx(expected, rel=1e-5, abs=1e-6), (got, expected)


def test_resolve_sources():
    assert resolve(env={}) == LaunchPlan("single")
    assert resolve("h:1", 2, 1, env={}) == LaunchPlan("explicit", "h:1", 2, 1)
    env = {"JAX_COORDINATOR_ADDRESS": "h:2", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
    assert resolve(env=env) == LaunchPlan("env", "h:2", 4, 3)
    slurm = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "16", "SLURM_PROCID": "5"}
    assert resolve(env=slurm) == LaunchPlan("slurm", None, 16, 5)
    assert resolve(env={**slurm, "SLURM_NTASKS": "1"}).source == "single"
    per_node = {**slurm, "SLURM_NTASKS": "2", "SLURM_NNODES": "2", "SLURM_GPUS_ON_NODE": "8"}
    assert resolve(env=per_node).local_device_ids == tuple(range(8))
    assert resolve(env={**slurm, "INTERNLM2_JAX_DISTRIBUTED": "off"}).source == "single"
    assert resolve(env={"INTERNLM2_JAX_DISTRIBUTED": "auto"}).source == "auto"
    with pytest.raises(ValueError, match="or none of them"):
        resolve("h:1", 2, env={})
    with pytest.raises(ValueError, match="only"):
        resolve(env={"JAX_NUM_PROCESSES": "2"})


def test_local_batch_slice():
    assert local_batch_slice(8, 1, 2) == slice(4, 8)
    assert local_batch_slice(8, 0, 4) == slice(0, 2)
    with pytest.raises(ValueError, match="not divisible"):
        local_batch_slice(6, 0, 4)
