"""`experiments.host_memory`: once `experiments` is imported, the 64 MB temporary of a jitted call stays in
glibc's heap after the call (reused by the next one); with `INTERNLM2_JAX_KEEP_HOST_MEMORY=0` it is unmapped
(the default)."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE = """
from experiments import host_memory  # first, as in an entry point: applies the settings on import
import ctypes, ctypes.util, time
import jax, jax.numpy as jnp

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                 "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.mallinfo2.restype = MallInfo2
f = jax.jit(lambda x: (jnp.sin(x) @ x[:, :8]).sum())  # sin(x): a 64 MB temporary
x = jnp.ones((4096, 4096)).block_until_ready()
for _ in range(3):
    f(x).block_until_ready()
# XLA frees a call's temporaries asynchronously, shortly after its result is ready: wait (bounded) for it.
deadline = time.monotonic() + 3.0
while libc.mallinfo2().fordblks < (64 << 20) and time.monotonic() < deadline:
    time.sleep(0.05)
print(host_memory.APPLIED, libc.mallinfo2().fordblks >> 20)  # MiB freed but kept by malloc
"""


def _probe(switch: str) -> tuple[bool, int]:
    env = {**os.environ, "INTERNLM2_JAX_KEEP_HOST_MEMORY": switch, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    kept, free_mib = out.stdout.split()
    return kept == "True", int(free_mib)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt / mallinfo2")
def test_freed_step_temporaries_stay_in_the_heap():
    kept, free_mib = _probe("1")
    default, default_free_mib = _probe("0")
    assert kept and not default
    assert free_mib >= 64, free_mib  # the temporary's block, ready for the next call (no page faults)
    assert default_free_mib < 64, default_free_mib  # glibc's default: mmapped per call, unmapped on free
