"""`attention(impl="pallas")` under a (data=2, fsdp=2, tensor=2) mesh of 8 fake CPU devices.

Runs in a subprocess so `--xla_force_host_platform_device_count=8` cannot leak into the other
tests' JAX runtime.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P
    from internlm2_jax.layers import attention_core as ac
    from internlm2_jax.layers.attention_sharded import sharded_flash_attention

    assert jax.device_count() == 8, jax.devices()
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"))
    B, S, H, KV, D = 4, 24, 4, 2, 64
    ks = jax.random.split(jax.random.PRNGKey(0), 3)
    q = jax.random.normal(ks[0], (B, S, H, D))
    k = jax.random.normal(ks[1], (B, S, KV, D))
    v = jax.random.normal(ks[2], (B, S, KV, D))
    seg = jnp.array([[0] * 10 + [1] * 14] * B, jnp.int32)
    qkv_sh = NamedSharding(mesh, P(("data", "fsdp"), None, "tensor", None))
    qs, kss, vs = (jax.device_put(x, qkv_sh) for x in (q, k, v))
    segs = jax.device_put(seg, NamedSharding(mesh, P(("data", "fsdp"), None)))

    def loss(impl):
        return lambda q, k, v, s: jnp.sum(jnp.sin(ac.attention(q, k, v, segment_ids=s, impl=impl)))

    with jax.set_mesh(mesh):  # mesh from context
        out = jax.jit(lambda *a: ac.attention(*a[:3], segment_ids=a[3], impl="pallas"))(qs, kss, vs, segs)
        grads = jax.jit(jax.grad(loss("pallas"), (0, 1, 2)))(qs, kss, vs, segs)
        jax.block_until_ready((out, grads))
    # explicit mesh argument, no segment ids
    out2 = jax.jit(lambda q, k, v: sharded_flash_attention(q, k, v, mesh=mesh))(qs, kss, vs)
    jax.block_until_ready(out2)

    ref = ac.attention(q, k, v, segment_ids=seg, impl="xla")
    ref2 = ac.attention(q, k, v, impl="xla")
    ref_grads = jax.grad(loss("xla"), (0, 1, 2))(q, k, v, seg)
    errs = [float(jnp.abs(out - ref).max()), float(jnp.abs(out2 - ref2).max())]
    errs += [float(jnp.abs(a - b).max()) for a, b in zip(grads, ref_grads)]
    assert max(errs) < 5e-5, errs
    assert len(out.sharding.device_set) == 8, out.sharding
    print("OK", errs)
    """
)


def test_sharded_pallas_attention_on_8_fake_devices():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=root, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "OK" in proc.stdout
