"""Train-step throughput (tokens/s, step time, MFU) of our `Trainer`, vs PyTorch on CPU.

    python -m experiments.bench_train_step                       # small CPU config, JAX vs PyTorch
    python -m experiments.bench_train_step --preset internlm2_1_8b --seq 4096   # on a GPU/TPU

On CPU the same-shaped Llama (`transformers.LlamaForCausalLM`: same widths, GQA, untied head,
RMSNorm, SwiGLU, RoPE) is trained with `torch.optim.AdamW` on the same batch and dtype, rounds of
the two frameworks alternate, and the last line is `speedup_vs_pytorch=<ours / theirs tokens/s>`.
CPU MFU is against a matmul peak measured on this machine (stated as such); on accelerators it is
against the datasheet bf16 peak (`train.flops.peak_flops_per_device`).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from experiments import host_memory


def _parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default=None, help="model preset (default: a small CPU Llama-shaped config)")
    ap.add_argument("--seq", type=int, default=None, help="sequence length (CPU default 256)")
    ap.add_argument("--batch", type=int, default=None, help="global batch rows (CPU default 4, preset 4)")
    ap.add_argument("--dtype", default=None,
                    help="compute dtypes of both frameworks, comma-separated (CPU default float32,bfloat16; "
                         "accelerators bfloat16)")
    ap.add_argument("--remat", default=None, help="remat policy (CPU default none, preset save_qkv_attn)")
    ap.add_argument("--unroll", action="store_true", help="python-unrolled layers instead of nn.scan")
    ap.add_argument("--scan_unroll", type=int, default=None,
                    help="layers per scan iteration (default: the model's, all layers on CPU; 1 = rolled loop)")
    ap.add_argument("--loss_chunk", type=int, default=None, help="cross-entropy chunk (CPU default seq, else 512)")
    ap.add_argument("--attention", default=None, help="attention_impl (CPU default xla, else auto)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per round")
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds (best round counts)")
    ap.add_argument("--no_torch", action="store_true", help="skip the PyTorch comparison")
    ap.add_argument("--mesh_fsdp", type=int, default=1, help="fsdp axis size (data fills the rest)")
    ap.add_argument("--json", default=None, help="also write the results (one entry per dtype) to this JSON file")
    return ap.parse_args()


def cpu_description() -> str:
    """The CPU's model name and the vector ISA XLA:CPU and PyTorch can use (`/proc/cpuinfo`), e.g.
    `Intel(R) Xeon(R) Platinum 8481C; avx2 avx512f avx512_bf16 amx_tile`."""
    try:
        info = open("/proc/cpuinfo").read()
    except OSError:
        return "unknown CPU"
    model = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "?")
    flags = next((set(ln.split(":", 1)[1].split()) for ln in info.splitlines() if ln.startswith("flags")), set())
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16") if f in flags]
    return f"{model}; {' '.join(isa) or 'no avx2'}; {os.cpu_count()} logical cores"


def matmul_peak(dtype: str, n: int = 1024, reps: int = 20) -> float:
    """Measured FLOP/s of an `n x n` jitted matmul in `dtype` on the default device (best of 3).

    Accumulates in fp32 and casts back, as the model's projections do (XLA:CPU's fast bf16 GEMMs
    write fp32; a bf16-output dot takes a ~2x slower path and would under-read the peak).
    """
    import jax
    import jax.numpy as jnp

    a = jnp.ones((n, n), dtype)
    step = lambda i, y: (jnp.matmul(y, a, preferred_element_type=jnp.float32) * 1e-3).astype(dtype)
    f = jax.jit(lambda x: jax.lax.fori_loop(0, reps, step, x))
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 * reps / best


class JaxRunner:
    """Our `Trainer` on a (data, fsdp) mesh over all local devices."""

    def __init__(self, config, batch: np.ndarray, loss_chunk: int, fsdp: int):
        import jax

        from internlm2_jax.sharding import MeshConfig, host_local_to_global, make_mesh
        from internlm2_jax.train.optimizer import OptimizerConfig, make_optimizer
        from internlm2_jax.train.causal_lm import StepConfig, causal_lm_trainer

        self.mesh = make_mesh(MeshConfig(data=-1, fsdp=fsdp))
        tx = make_optimizer(OptimizerConfig(peak_lr=1e-4, warmup_steps=10))
        self.trainer = causal_lm_trainer(config, tx, self.mesh, StepConfig(loss_chunk=loss_chunk))
        self.state = self.trainer.init_state(jax.random.key(0))
        self.batch = host_local_to_global({"tokens": batch}, self.mesh)
        self.loss = float("nan")

    def run(self, steps: int) -> float:
        import jax

        t = time.perf_counter()
        for _ in range(steps):  # block every step: fake-device CPU collectives deadlock otherwise
            self.state, metrics = self.trainer.step(self.state, self.batch)
            self.loss = float(jax.block_until_ready(metrics["loss"]))
        return time.perf_counter() - t


class TorchRunner:
    """`transformers.LlamaForCausalLM` of the same shape, AdamW + clip 1.0, same batch and dtype."""

    def __init__(self, config, batch: np.ndarray, dtype: str):
        import torch
        import transformers

        torch.manual_seed(0)
        torch.set_num_threads(os.cpu_count() or 1)
        hf = transformers.LlamaConfig(
            vocab_size=config.vocab_size, hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size, num_hidden_layers=config.num_hidden_layers,
            num_attention_heads=config.num_attention_heads, num_key_value_heads=config.num_key_value_heads,
            max_position_embeddings=max(config.max_position_embeddings, batch.shape[1]),
            rope_theta=config.rope_theta, rms_norm_eps=config.rms_norm_eps, tie_word_embeddings=False,
            attention_bias=False, mlp_bias=False)
        self.torch = torch
        self.model = transformers.LlamaForCausalLM._from_config(hf, attn_implementation="sdpa")
        self.model.to(getattr(torch, dtype)).train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1,
                                     fused=True)  # its fastest CPU AdamW
        self.ids = torch.from_numpy(batch.astype(np.int64))
        self.loss = float("nan")

    def run(self, steps: int) -> float:
        t = time.perf_counter()
        for _ in range(steps):
            loss = self.model(input_ids=self.ids, labels=self.ids).loss
            loss.backward()
            self.torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            self.loss = float(loss.detach())
        return time.perf_counter() - t


def _timed(name: str, runner, steps: int, tokens: int, times: list[float]) -> None:
    dt = runner.run(steps) / steps
    times.append(dt)
    print(f"  {name:<8} step {dt * 1e3:8.1f} ms  {tokens / dt:10.0f} tok/s  loss {runner.loss:.4f}", flush=True)


def main() -> None:
    args = _parse()
    import jax

    on_cpu = jax.devices()[0].platform == "cpu"
    dtypes = (args.dtype or ("float32,bfloat16" if on_cpu else "bfloat16")).split(",")
    results = {dtype: run(args, dtype) for dtype in dtypes}
    for dtype, res in results.items():  # the headline lines together at the end
        if "speedup_vs_pytorch" in res:
            print(f"speedup_vs_pytorch[{dtype}]={res['speedup_vs_pytorch']:.3f} "
                  f"(median per-round {res['median_round_ratio']:.3f})")
    if args.json:
        tmp = f"{args.json}.tmp"
        with open(tmp, "w") as f:
            json.dump(results, f, indent=1)
        os.replace(tmp, args.json)


def run(args: argparse.Namespace, dtype: str) -> dict:
    """One dtype: warm-up, alternating rounds; returns tokens/s, step ms and MFU per framework (+ the ratio)."""
    import jax

    from internlm2_jax.config import get_preset
    from internlm2_jax.train.flops import flops_per_token, mfu, peak_flops_per_device

    on_cpu = jax.devices()[0].platform == "cpu"
    compare = on_cpu and not args.no_torch
    seq = args.seq or (256 if args.preset is None else 4096)
    bsz = args.batch or 4
    remat = args.remat or ("none" if args.preset is None else "save_qkv_attn")
    attn = args.attention or ("xla" if on_cpu else "auto")
    over = dict(dtype=dtype, remat_policy=remat, scan_layers=not args.unroll, scan_unroll=args.scan_unroll,
                attention_impl=attn,
                max_position_embeddings=max(seq, 128))
    if args.preset is None:  # small Llama-shaped model: ~13M params, GQA 8/4
        config = get_preset("tiny", vocab_size=8192, hidden_size=256, intermediate_size=704,
                            num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4, **over)
    else:
        config = get_preset(args.preset, **over)
    chunk = args.loss_chunk or (seq if on_cpu else 512)  # CPU: one chunk was fastest; GPU: bounded logits
    tokens = bsz * seq
    n_dev = jax.device_count()
    print(f"device: {jax.devices()[0].device_kind} x{n_dev}  preset={args.preset or 'bench-small'} "
          f"batch={bsz} seq={seq} dtype={dtype}{' (both frameworks)' if compare else ''} remat={remat} "
          f"layers={'unrolled' if args.unroll else 'scan'} attention={attn} loss_chunk={chunk}")
    # Set on import of `experiments` (before numpy/JAX threads); process-wide, so PyTorch gets it too.
    kept = "one glibc arena, no mmap (experiments.host_memory; both frameworks)"
    print(f"host allocator: {kept if host_memory.APPLIED else 'glibc defaults'} — set {host_memory.ENV_SWITCH}=0 "
          "for the defaults")
    fpt = flops_per_token(config, seq)
    peak = peak_flops_per_device()
    peak_note = "datasheet bf16 peak"
    if on_cpu:
        print(f"cpu: {cpu_description()}; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    result: dict = {"device": cpu_description() if on_cpu else jax.devices()[0].device_kind, "devices": n_dev, "preset": args.preset or "bench-small",
                    "batch": bsz, "seq": seq, "dtype": dtype, "remat": remat, "attention": attn,
                    "layers": "unrolled" if args.unroll else f"scan (unroll {args.scan_unroll or 'default'})", "peak_flops": None, "peak_note": None}
    if peak is None:
        peak, peak_note = matmul_peak(dtype), f"measured {dtype} 1024^3 matmul peak of this CPU"
    print(f"model FLOPs/token {fpt:.4g}; peak {peak / 1e9:.1f} GFLOP/s per device ({peak_note})")

    batch = np.random.default_rng(0).integers(0, config.vocab_size, (bsz, seq)).astype(np.int32)
    runners: dict[str, object] = {"jax": JaxRunner(config, batch, chunk, args.mesh_fsdp)}
    if compare:
        runners["pytorch"] = TorchRunner(config, batch, dtype)
    times: dict[str, list[float]] = {k: [] for k in runners}
    t0 = time.perf_counter()
    for name, r in runners.items():  # warm-up / compile
        r.run(2)
    print(f"warm-up (incl. compile) {time.perf_counter() - t0:.1f} s")
    for i in range(args.rounds):
        print(f"round {i + 1}/{args.rounds}")
        order = list(runners.items())
        for name, r in order if i % 2 == 0 else order[::-1]:  # ABBA: a load trend favours neither side
            _timed(name, r, args.steps, tokens, times[name])
    best: dict[str, float] = {k: tokens / min(v) for k, v in times.items()}
    if peak_note.startswith("measured"):  # re-measure: a busy moment at start under-reads the peak
        peak = max(peak, matmul_peak(dtype))
        print(f"CPU matmul peak (max of start/end measurements): {peak / 1e9:.1f} GFLOP/s")
    result["peak_flops"], result["peak_note"] = peak, peak_note
    for name, tps in best.items():
        m = mfu(tps, config, seq, n_dev, peak)
        print(f"{name}: {tps:.0f} tok/s (best round), step {tokens / tps * 1e3:.1f} ms, "
              f"MFU {m * 100:.1f}% ({peak_note})")
        result[name] = {"tokens_per_s": tps, "step_ms": tokens / tps * 1e3, "mfu": m}
    if "pytorch" in best:  # per-round pairs ran back to back, so their ratio shares the machine's load
        pairs = sorted(tp / tj for tj, tp in zip(times["jax"], times["pytorch"]))
        result["median_round_ratio"] = pairs[len(pairs) // 2]
        result["speedup_vs_pytorch"] = best["jax"] / best["pytorch"]
        print(f"[{dtype}] median per-round ratio {pairs[len(pairs) // 2]:.3f} (shared 2-core CPUs are noisy; "
              "the headline compares best rounds)")
        print(f"[{dtype}] speedup_vs_pytorch={best['jax'] / best['pytorch']:.3f}", flush=True)
    return result




if __name__ == "__main__":
    main()
