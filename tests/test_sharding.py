"""Sharded training equivalence on 8 fake CPU devices (in a subprocess: XLA flags are per-process)."""

import os
import subprocess
import sys

import pytest

from internlm2_jax.sharding import MeshConfig

HERE = os.path.dirname(__file__)


def _run(script: str, *args: str, timeout: int = 400, **env_vars: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.path.dirname(HERE), **env_vars}
    proc = subprocess.run([sys.executable, os.path.join(HERE, "workers", script), *args], capture_output=True,
                          text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_same_loss_and_grads_on_every_mesh():
    # Compiled here, not loaded from the session's cache, so that XLA's partitioner warnings are printed.
    proc = _run("sharded_equivalence.py", JAX_ENABLE_COMPILATION_CACHE="false")
    assert "ALL OK" in proc.stdout
    for name in ("data8", "fsdp8", "d2f2t2", "tensor2", "sequence2"):
        assert f"{name} ok" in proc.stdout
    # No activation or parameter is replicated on every device to change its sharding (on d2f2t2 the
    # embedding lookup was, before the table was FSDP-gathered explicitly).
    assert "Involuntary full rematerialization" not in proc.stderr, proc.stderr[-3000:]


def test_mesh_sizes_fill_and_errors():
    assert MeshConfig(data=-1, tensor=2).sizes(8) == {"data": 4, "fsdp": 1, "tensor": 2, "sequence": 1}
    with pytest.raises(ValueError, match="only one mesh axis may be -1"):
        MeshConfig(data=-1, fsdp=-1).sizes(8)
    with pytest.raises(ValueError, match="not divisible by the fixed axes"):
        MeshConfig(data=-1, tensor=3).sizes(8)
    with pytest.raises(ValueError, match="positive or -1"):
        MeshConfig(tensor=0).sizes(8)


def test_checkpoint_restores_onto_a_different_mesh(tmp_path):
    assert "RESHARD OK" in _run("reshard_restore.py", str(tmp_path / "ckpt")).stdout
