"""The prepared accelerator check: one command on one GPU (or TPU VM) that writes one JSON summary.

    python -m experiments.device_check --out device_check.json          # on the accelerator, < 8 min on an H100
    python -m experiments.device_check --dry_run --out /tmp/dc.json      # its logic on a CPU, tiny sizes (~1 min)

Stages (each bounded; a failed stage is recorded and the next one runs; the JSON is rewritten after each, so a
run cut short keeps what finished):
  1. `kernels`: the compiled Pallas kernels (`kernel_backend="auto"`: Triton on GPU, Mosaic on TPU) against the
     XLA reference: flash forward and gradients (causal, GQA, with and without packed segment ids), the decode
     kernel with the new token apart from the cache, and the model's logits / chunked prefill / decode step with
     `attention_impl="pallas"` against `"xla"`; plus `pytest tests/test_flash_model.py` (not in a dry run).
  2. `attention`: `bench_attention` rows (Pallas vs `jax.nn.dot_product_attention` xla and cudnn, seq 1k-16k,
     fwd and fwd+bwd TFLOP/s).
  3. `train_step`: `bench_train_step --preset internlm2_1_8b --seq 4096` (tokens/s, step time, MFU).
  4. `decode`: `generate` tokens/s and ms per step of the 1.8B model, batch 16, 512-token prompts, greedy.
Exit status: 0 when every stage passed, 1 otherwise (the JSON says which and why).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
import traceback
from typing import Any, Callable

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_json(path: str, data: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, default=float)
    os.replace(tmp, path)


def max_err(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


# ---- stage 1: kernels against the XLA reference --------------------------------------------------------------
def check_kernels(dry: bool) -> dict:
    import jax
    import jax.numpy as jnp

    from internlm2_jax.layers.attention_core import make_attention_mask, xla_attention
    from kernels_pallas import decode_attention, flash_attention

    out: dict[str, Any] = {"cases": []}
    dtype = jnp.float32 if dry else jnp.bfloat16
    tol = 2e-4 if dry else 3e-2  # bf16 inputs, fp32 accumulation
    shapes = [(1, 128, 4, 2, 64)] if dry else [(2, 1024, 16, 4, 128), (1, 2048, 32, 8, 128), (2, 1000, 8, 8, 64)]
    for b, s, h, kvh, d in shapes:
        for packed in (False, True):
            ks = jax.random.split(jax.random.key(s + packed), 4)
            q = jax.random.normal(ks[0], (b, s, h, d), jnp.float32).astype(dtype)
            k = jax.random.normal(ks[1], (b, s, kvh, d), jnp.float32).astype(dtype)
            v = jax.random.normal(ks[2], (b, s, kvh, d), jnp.float32).astype(dtype)
            ct = jax.random.normal(ks[3], (b, s, h, d), jnp.float32).astype(dtype)
            seg = jnp.broadcast_to(jnp.arange(s) * 3 // s, (b, s)).astype(jnp.int32) if packed else None
            mask = make_attention_mask(s, s, q_segment_ids=seg, causal=True)
            f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
            ref_fn = lambda q, k, v: xla_attention(f32(q), f32(k), f32(v), mask)  # noqa: E731
            ker_fn = lambda q, k, v: flash_attention(q, k, v, segment_ids=seg, causal=True)  # noqa: E731
            ref, ref_vjp = jax.vjp(ref_fn, q, k, v)
            got, vjp = jax.vjp(jax.jit(ker_fn), q, k, v)
            errs = {"out": max_err(got, ref)}
            for name, g, r in zip(("dq", "dk", "dv"), vjp(ct), ref_vjp(f32(ct))):
                errs[name] = max_err(g, r) / max(1.0, float(jnp.max(jnp.abs(r))))
            out["cases"].append({"kernel": "flash", "shape": [b, s, h, kvh, d], "packed": packed,
                                 "max_err": errs, "ok": all(e <= tol for e in errs.values())})
    b, t, h, kvh, d = (2, 256, 4, 2, 64) if dry else (8, 4096, 32, 8, 128)
    ks = jax.random.split(jax.random.key(1), 5)
    q = jax.random.normal(ks[0], (b, h, d), jnp.float32).astype(dtype)
    kc, vc = (jax.random.normal(kk, (b, t, kvh, d), jnp.float32).astype(dtype) for kk in ks[1:3])
    kn, vn = (jax.random.normal(kk, (b, kvh, d), jnp.float32).astype(dtype) for kk in ks[3:5])
    lengths = jnp.arange(b, dtype=jnp.int32) * (t // b)
    got = jax.jit(lambda *a: decode_attention(*a[:4], k_new=a[4], v_new=a[5]))(q, kc, vc, lengths, kn, vn)
    put = jax.vmap(lambda c, n, i: jax.lax.dynamic_update_slice(c, n[None], (i, 0, 0)))
    kf, vf = put(kc, kn, lengths), put(vc, vn, lengths)
    ref = xla_attention(q[:, None].astype(jnp.float32), kf.astype(jnp.float32), vf.astype(jnp.float32),
                        make_attention_mask(1, t, causal=False, kv_lengths=lengths + 1))[:, 0]
    err = max_err(got, ref)
    out["cases"].append({"kernel": "decode", "shape": [b, t, h, kvh, d], "max_err": {"out": err}, "ok": err <= tol})
    out["cases"].append(_model_case(dry))
    out["ok"] = all(c["ok"] for c in out["cases"])
    return out


def _model_case(dry: bool) -> dict:
    """Logits of the forward, a chunked prefill and a decode step: attention_impl pallas vs xla (fp32)."""
    import jax
    import jax.numpy as jnp

    import internlm2_jax
    from internlm2_jax.config import get_preset

    base = get_preset("tiny", dtype="float32", hidden_size=256, num_attention_heads=2, num_key_value_heads=1,
                      max_position_embeddings=2048)
    params = internlm2_jax.init_params(base, jax.random.key(0))
    s = 96 if dry else 1000
    tokens = jax.random.randint(jax.random.key(1), (2, s), 0, base.vocab_size)
    lengths = jnp.asarray([s, s // 2 + 3])
    res = {}
    for impl in ("xla", "pallas"):
        cfg = dataclasses.replace(base, attention_impl=impl)
        logits = jax.jit(lambda p, t: internlm2_jax.forward(cfg, p, t))(params, tokens)
        last, cache = jax.jit(lambda p, t, n: internlm2_jax.model.prefill_last(
            cfg, p, t, max_len=s + 32, lengths=n, chunk=s // 3))(params, tokens, lengths)
        step, _ = jax.jit(lambda p, c, t: internlm2_jax.decode_step(cfg, p, c, t))(params, cache, tokens[:, 0])
        res[impl] = (logits, last, step)
    errs = {name: max_err(a, b) for name, a, b in zip(("forward", "prefill", "decode"), res["pallas"], res["xla"])}
    return {"kernel": "model", "shape": [2, s], "max_err": errs, "ok": all(e <= 2e-3 for e in errs.values())}


def pytest_flash_model(budget_s: float) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_flash_model.py"]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=budget_s)
    tail = (p.stdout + p.stderr).strip().splitlines()[-3:]
    return {"command": " ".join(cmd[2:]), "returncode": p.returncode, "tail": tail, "ok": p.returncode == 0}


# ---- stages 2-4: benchmarks ----------------------------------------------------------------------------------
def bench_attention(dry: bool, save: Callable[[list], None]) -> dict:
    import jax.numpy as jnp

    from experiments import bench_attention as ba

    seqs = [128, 256] if dry else [1024, 2048, 4096, 8192, 16384]
    heads = (4, 1) if dry else (32, 8)
    rows: list = []

    def keep(row):
        rows.append(row)
        save(rows)
    ba.measure(seqs, batch=1, heads=heads[0], kv_heads=heads[1], head_dim=128, dtype=jnp.bfloat16,
               iters=1 if dry else 10, impls=ba.IMPLS, report=keep)
    return {"rows": rows, "ok": all("pallas" in r["tflops"] for r in rows)}


def bench_train_step(dry: bool, budget_s: float, out_json: str) -> dict:
    args = (["--steps", "1", "--rounds", "1", "--no_torch", "--dtype", "float32"] if dry else
            ["--preset", "internlm2_1_8b", "--seq", "4096", "--steps", "5", "--rounds", "3"])
    cmd = [sys.executable, "-m", "experiments.bench_train_step", *args, "--json", out_json]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=budget_s)
    res = json.load(open(out_json)) if p.returncode == 0 and os.path.exists(out_json) else None
    return {"command": " ".join(cmd[1:]), "returncode": p.returncode, "results": res,
            "tail": (p.stdout + p.stderr).strip().splitlines()[-4:], "ok": res is not None}


def bench_decode(dry: bool) -> dict:
    import jax

    import internlm2_jax
    from internlm2_jax.config import get_preset

    if dry:
        cfg, batch, prompt, new = get_preset("tiny", dtype="float32", attention_impl="auto"), 2, 16, 8
    else:
        cfg, batch, prompt, new = get_preset("internlm2_1_8b", dtype="bfloat16", attention_impl="auto"), 16, 512, 128
    params = jax.jit(lambda k: internlm2_jax.init_params(cfg, k))(jax.random.key(0))
    params = jax.tree.map(lambda x: x.astype(cfg.compute_dtype), params)
    tokens = np.random.default_rng(1).integers(3, cfg.vocab_size, (batch, prompt)).tolist()
    times = {}
    for n in (1, new):  # no stop ids: every row decodes all n tokens
        run = lambda: internlm2_jax.generate(cfg, params, tokens, max_new_tokens=n, stop_ids=())  # noqa: E731
        jax.block_until_ready(run())  # compile
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            jax.block_until_ready(run())
            best = min(best, time.perf_counter() - t0)
        times[n] = best
    ms = (times[new] - times[1]) / (new - 1) * 1e3
    return {"model": "tiny" if dry else "internlm2_1_8b", "batch": batch, "prompt": prompt, "new_tokens": new,
            "tokens_per_s": batch * new / times[new], "ms_per_step": ms, "decode_tokens_per_s": batch / ms * 1e3,
            "ok": True}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="device_check.json", help="the JSON summary (rewritten after each stage)")
    ap.add_argument("--dry_run", action="store_true", help="tiny sizes; automatic when no GPU/TPU is present")
    ap.add_argument("--stages", default="kernels,attention,train_step,decode")
    args = ap.parse_args(argv)

    import jax

    platform = jax.default_backend()
    dry = args.dry_run or platform == "cpu"
    summary: dict[str, Any] = {"platform": platform, "device": jax.devices()[0].device_kind,
                               "devices": jax.device_count(), "jax": jax.__version__, "dry_run": dry,
                               "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "stages": {}}
    stages: dict[str, Callable[[], dict]] = {
        "kernels": lambda: {**check_kernels(dry), "pytest": {"ok": True, "skipped": "dry run (the default suite "
                                                             "runs it)"} if dry else pytest_flash_model(120)},
        "attention": lambda: bench_attention(dry, lambda rows: (summary["stages"].__setitem__(
            "attention", {"rows": rows, "partial": True}), write_json(args.out, summary))),
        "train_step": lambda: bench_train_step(dry, 300, f"{args.out}.train.json"),
        "decode": lambda: bench_decode(dry),
    }
    for name in args.stages.split(","):
        t0 = time.perf_counter()
        print(f"[device_check] {name} ...", flush=True)
        try:
            res = stages[name]()
            if name == "kernels":
                res["ok"] = res["ok"] and res["pytest"]["ok"]
        except Exception as e:  # noqa: BLE001 - recorded; the next stage still runs
            res = {"ok": False, "error": f"{type(e).__name__}: {e}"[:2000], "traceback": traceback.format_exc()[-4000:]}
        res["seconds"] = round(time.perf_counter() - t0, 1)
        summary["stages"][name] = res
        write_json(args.out, summary)
        print(f"[device_check] {name}: {'ok' if res['ok'] else 'FAILED'} in {res['seconds']} s", flush=True)
    summary["ok"] = all(s["ok"] for s in summary["stages"].values())
    write_json(args.out, summary)
    print(f"[device_check] {'all stages passed' if summary['ok'] else 'some stages FAILED'}; summary in {args.out}")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
