"""Attention throughput: Pallas flash kernels vs `jax.nn.dot_product_attention` (xla / cudnn).

Usage:  python experiments/bench_attention.py [--quick] [--seqs 512,1024,...] [--batch 1]

Reports TFLOP/s for forward and forward+backward, causal, head_dim 128, 32 q / 8 kv heads,
with and without packed segment ids (4 equal documents per row). FLOPs: forward
`4 * B * H * S^2 * D`, halved for causal; forward+backward = 3.5x forward (FA2 convention:
the backward does 5 of the 7 matmul-equivalents). Combos that fail (e.g. cudnn unavailable,
out of memory) are skipped with the reason printed.

On CPU the sizes shrink automatically (same as `--quick`) and the Pallas kernels run in
interpret mode: CPU numbers only show that everything runs and mean nothing for speed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Callable, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from kernels_pallas import flash_attention  # noqa: E402

IMPLS = ("pallas", "xla", "cudnn")


def _segments(b: int, s: int, docs: int = 4) -> jax.Array:
    return jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32) * docs // s, (b, s))


def make_attn(impl: str, seg: Optional[jax.Array]) -> Callable:
    """`f(q, k, v) -> out` for one implementation (causal, optional segment ids)."""
    if impl == "pallas":
        return lambda q, k, v: flash_attention(q, k, v, segment_ids=seg, causal=True)
    mask = None if seg is None else (seg[:, :, None] == seg[:, None, :])[:, None]
    return lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, mask=mask, is_causal=True, implementation=impl)


def _time(fn: Callable, args, iters: int) -> float:
    jax.block_until_ready(fn(*args))  # compile + warm up
    start = time.perf_counter()
    for _ in range(iters):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / iters


def bench_one(impl, b, s, h, kvh, d, dtype, with_seg, iters, backward):
    ks = jax.random.split(jax.random.PRNGKey(0), 3)
    q = jax.random.normal(ks[0], (b, s, h, d), dtype)
    k = jax.random.normal(ks[1], (b, s, kvh, d), dtype)
    v = jax.random.normal(ks[2], (b, s, kvh, d), dtype)
    attn = make_attn(impl, _segments(b, s) if with_seg else None)
    flops = 4 * b * h * s * s * d / 2  # causal
    if not backward:
        sec = _time(jax.jit(attn), (q, k, v), iters)
        return flops / sec / 1e12, sec
    grad = jax.jit(jax.grad(lambda q, k, v: jnp.sum(attn(q, k, v).astype(jnp.float32)), (0, 1, 2)))
    sec = _time(grad, (q, k, v), iters)
    return 3.5 * flops / sec / 1e12, sec


def measure(seqs, *, batch: int, heads: int, kv_heads: int, head_dim: int, dtype, iters: int, impls,
            report: Optional[Callable[[dict], None]] = None) -> list[dict]:
    """One row per (seq, segments, pass): `{"seq", "segments", "pass", "tflops": {impl: x}, "skipped": {impl:
    reason}}`; `report(row)` is called as each row completes (printing, or saving partial results)."""
    rows = []
    for s in seqs:
        for with_seg in (False, True):
            for backward in (False, True):
                row = {"seq": s, "segments": with_seg, "pass": "fwd+bwd" if backward else "fwd",
                       "tflops": {}, "skipped": {}}
                for impl in impls:
                    try:
                        row["tflops"][impl], _ = bench_one(impl, batch, s, heads, kv_heads, head_dim, dtype,
                                                           with_seg, iters, backward)
                    except Exception as e:  # noqa: BLE001 - report and keep going
                        reason = str(e).strip().splitlines()[0][:120] if str(e).strip() else ""
                        row["skipped"][impl] = f"{type(e).__name__}: {reason}"
                rows.append(row)
                if report is not None:
                    report(row)
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes (automatic on CPU)")
    p.add_argument("--seqs", default="512,1024,2048,4096,8192,16384")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--impls", default=",".join(IMPLS))
    args = p.parse_args(argv)

    platform = jax.default_backend()
    seqs = [int(x) for x in args.seqs.split(",")]
    h, kvh, iters = args.heads, args.kv_heads, args.iters
    if args.quick or platform == "cpu":
        seqs, h, kvh, iters = [128, 256], 4, 1, 1
        print(f"# quick mode on {platform}: Pallas runs in interpret mode; numbers mean nothing "
              "for speed")
    dtype = jnp.dtype(args.dtype)
    impls = args.impls.split(",")
    print(f"# device={jax.devices()[0].device_kind} batch={args.batch} heads={h}/{kvh} "
          f"head_dim={args.head_dim} dtype={dtype.name} causal")
    header = f"{'seq':>6} {'segs':>4} {'pass':>7} " + " ".join(f"{i:>14}" for i in impls)
    header += "  " + " ".join(f"{'pallas/' + i:>12}" for i in impls if i != "pallas")
    print(header)

    def show(row: dict) -> None:
        tflops = row["tflops"]
        cells = " ".join(f"{tflops[i]:14.4f}" if i in tflops else f"{'skip':>14}" for i in impls)
        ratios = " ".join(f"{tflops['pallas'] / tflops[i]:12.2f}" if "pallas" in tflops and i in tflops
                          else f"{'-':>12}" for i in impls if i != "pallas")
        print(f"{row['seq']:>6} {'yes' if row['segments'] else 'no':>4} {row['pass']:>7} {cells}  {ratios}",
              flush=True)
        for impl, why in row["skipped"].items():
            print(f"#   {impl} skipped: {why}", flush=True)

    measure(seqs, batch=args.batch, heads=h, kv_heads=kvh, head_dim=args.head_dim, dtype=dtype, iters=iters,
            impls=impls, report=show)


if __name__ == "__main__":
    main()
