"""Decode throughput of `generate` (sort-free sampler) vs the sort-based sampler it replaced, on CPU.

    python -m experiments.bench_generate                  # fp32 and bf16, about 2 min on 2 CPU cores
    python -m experiments.bench_generate --quick          # fp32 only, fewer rounds (about 40 s)
    python -m experiments.bench_generate --head_scale 1   # the random-init model's near-uniform logits
    python -m experiments.bench_generate --easydel /tmp/edvenv/bin/python   # + EasyDeL, ~3 min more per dtype

EasyDeL (a JAX LLM library) is an optional peer: `--easydel` names the python of a separate venv holding
`easydel==0.3.0` (it pins other jax/flax versions; never install it into this project's venv), e.g.
`python3 -m venv /tmp/edvenv && /tmp/edvenv/bin/pip install easydel==0.3.0 pillow torch` (its import needs
both). Its InternLM2 of the same shape and head scaling runs its `model.generate` in a subprocess; ms per
step there is (t(64) - t(8)) / 56.

Model: a 19.7M-parameter InternLM2 (the `tiny` preset widened: vocab 92544, hidden 104, 4 layers, heads 4/2),
batch 8, 64-token prompts, 64 new tokens, no stop ids. A random-init model's next-token distribution is nearly
uniform over all 92544 ids (top-p 0.9 keeps ~80k of them), nothing like a trained LM's; `--head_scale 30`
(the default) multiplies the output head so the mean entropy is ~2.5 nats and top-p 0.9 keeps 1-70 tokens
(printed below). Measured:
  * `generate(...)` tokens/s, greedy and top-p 0.9 at temperature 1, and their ratio;
  * ms per decode step = (t(64 new tokens) - t(1 new token)) / 63, prefill excluded;
  * the baseline in the same run: the old sort-based sampler (`sort_sampler_before`, a verbatim copy) in the
    same decode loop, ms per step from 8 vs 1 new tokens (a step costs ~0.2 s); the last lines are
    `speedup_vs_sort_sampler[dtype]=<old ms per top-p step / new>`.
Rounds alternate the order of the measurements; best and median over rounds are printed.
"""

from __future__ import annotations

import argparse
import functools
import json
import subprocess
import sys
import time
from typing import Any, Callable

import numpy as np

BATCH, PROMPT, NEW, BASELINE_NEW = 8, 64, 64, 8
MODEL = dict(vocab_size=92544, hidden_size=104, intermediate_size=288, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)
TOP_P = dict(temperature=1.0, top_p=0.9)


def sort_sampler_before(logits, rng, *, temperature=0.0, top_k=0, top_p=1.0):
    """The sampler `generate` used before `internlm2_jax.sampling` (verbatim): it sorts the vocabulary."""
    import jax
    import jax.numpy as jnp

    logits = logits.astype(jnp.float32)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    temperature = jnp.asarray(temperature, jnp.float32)
    scaled = logits / jnp.where(temperature > 0, temperature, 1.0)
    neg = jnp.finfo(jnp.float32).min
    sorted_desc = jnp.sort(scaled, axis=-1)[:, ::-1]
    v = logits.shape[-1]
    top_k = jnp.asarray(top_k, jnp.int32)
    kth = jnp.take_along_axis(sorted_desc, jnp.clip(top_k - 1, 0, v - 1)[None, None].repeat(
        logits.shape[0], 0), axis=-1)
    kth = jnp.where(top_k > 0, kth, neg)
    probs = jax.nn.softmax(jnp.where(sorted_desc < kth, neg, sorted_desc), axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each sorted token
    keep = (before < top_p) & (sorted_desc >= kth)
    cutoff = jnp.min(jnp.where(keep, sorted_desc, jnp.inf), axis=-1, keepdims=True)
    sampled = jax.random.categorical(rng, jnp.where(scaled < cutoff, neg, scaled), axis=-1).astype(jnp.int32)
    return jnp.where(temperature > 0, sampled, greedy)


@functools.lru_cache(maxsize=None)
def _sort_loop():
    """`generate`'s decode loop (prefill, then `_prepare` + sampler + `decode_step` per token) with the old
    sampler; no stop ids, so every call runs all `max_new_tokens` steps, as `generate` does here."""
    import jax
    import jax.numpy as jnp

    from internlm2_jax.generate import _prepare
    from internlm2_jax.model import decode_step, prefill

    @functools.partial(jax.jit, static_argnames=("config", "max_new_tokens"))
    def loop(config, params, tokens, rng, knobs, *, max_new_tokens):
        b, p = tokens.shape
        logits, cache = prefill(config, params, tokens, max_len=p + max_new_tokens)
        seen = jnp.zeros((b, logits.shape[-1]), bool).at[jnp.arange(b)[:, None], tokens].set(True)

        def body(i, carry):
            out, last, seen, cache, rng = carry
            rng, sub = jax.random.split(rng)
            tok = sort_sampler_before(_prepare(last, seen, knobs), sub, temperature=knobs["temperature"],
                                      top_k=knobs["top_k"], top_p=knobs["top_p"])
            last, cache = decode_step(config, params, cache, tok)
            return out.at[:, i].set(tok), last, seen.at[jnp.arange(b), tok].set(True), cache, rng

        init = (jnp.zeros((b, max_new_tokens), jnp.int32), logits[:, -1], seen, cache, rng)
        return jax.lax.fori_loop(0, max_new_tokens, body, init)[0]

    return loop


def _stats(times: list[float]) -> tuple[float, float]:
    return min(times), float(np.median(times))


def run_dtype(dtype: str, head_scale: float, rounds: int, baseline_rounds: int) -> dict[str, Any]:
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from internlm2_jax.config import get_preset
    from internlm2_jax.generate import _knobs, generate
    from internlm2_jax.model import init_params, param_count, prefill
    from internlm2_jax.sampling import kept_mask

    cfg = get_preset("tiny", dtype=dtype, **MODEL)
    params = nn.meta.unbox(init_params(cfg, jax.random.key(0)))
    params = {**params, "output": params["output"] * head_scale}
    prompts = np.random.default_rng(0).integers(3, cfg.vocab_size, (BATCH, PROMPT)).astype(np.int32)
    logits, _ = jax.jit(lambda p, t: prefill(cfg, p, t, max_len=PROMPT))(params, jnp.asarray(prompts))
    last = logits[:, -1]
    kept = np.asarray(kept_mask(last, jnp.ones(BATCH), jnp.zeros(BATCH, jnp.int32), jnp.full(BATCH, 0.9))).sum(1)
    prob = jax.nn.softmax(last, axis=-1)
    entropy = float(jnp.mean(-jnp.sum(prob * jnp.log(jnp.maximum(prob, 1e-30)), axis=-1)))
    print(f"[{dtype}] {param_count(cfg) / 1e6:.1f}M params, head x{head_scale:g}: at the prompt end entropy "
          f"{entropy:.2f} nats, top-p 0.9 keeps {kept.min()}-{kept.max()} tokens (mean {kept.mean():.0f})", flush=True)

    def ours(n: int, kw: dict) -> Callable[[], Any]:
        return lambda: generate(cfg, params, prompts.tolist(), max_new_tokens=n, stop_ids=(),
                                rng=jax.random.key(1), **kw)

    loop = _sort_loop()

    def before(n: int, kw: dict) -> Callable[[], Any]:
        knobs = _knobs(kw.get("temperature", 0.0), 0, kw.get("top_p", 1.0), 1.0, None)
        return lambda: np.asarray(loop(cfg, params, jnp.asarray(prompts), jax.random.key(1), knobs,
                                       max_new_tokens=n))

    cases = {("ours", mode, n): ours(n, kw) for mode, kw in (("greedy", {}), ("top_p", TOP_P)) for n in (NEW, 1)}
    base = {("sort", mode, n): before(n, kw) for mode, kw in (("greedy", {}), ("top_p", TOP_P))
            for n in (BASELINE_NEW, 1)}
    t0 = time.perf_counter()
    for fn in [*cases.values(), *base.values()]:
        fn()  # compile + warm up
    print(f"[{dtype}] compile + warm-up {time.perf_counter() - t0:.1f} s", flush=True)
    times: dict[tuple, list[float]] = {k: [] for k in [*cases, *base]}
    for r in range(rounds):
        order = list(cases.items()) + (list(base.items()) if r < baseline_rounds else [])
        for key, fn in order if r % 2 == 0 else order[::-1]:
            t = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - t)
    res: dict[str, Any] = {}
    print(f"[{dtype}] {'measurement':<44}{'best':>10}{'median':>10}")
    for mode in ("greedy", "top_p"):
        best, med = _stats(times[("ours", mode, NEW)])
        res[f"{mode}_tok_s"] = BATCH * NEW / best
        print(f"[{dtype}] {mode + ' tokens/s (generate, 8 x 64 new)':<44}{BATCH * NEW / best:>10.1f}"
              f"{BATCH * NEW / med:>10.1f}")
    for who, n in (("ours", NEW), ("sort", BASELINE_NEW)):
        for mode in ("greedy", "top_p"):
            long, short = times[(who, mode, n)], times[(who, mode, 1)]
            per = sorted((a - b) / (n - 1) * 1e3 for a, b in zip(long, short))  # per round, same load
            res[f"{who}_{mode}_ms"] = (min(long) - min(short)) / (n - 1) * 1e3
            name = f"{'new' if who == 'ours' else 'old sort-based'} sampler: ms per {mode} step"
            print(f"[{dtype}] {name:<44}{res[f'{who}_{mode}_ms']:>10.2f}{per[len(per) // 2]:>10.2f}")
    res["ratio"] = res["top_p_tok_s"] / res["greedy_tok_s"]
    print(f"[{dtype}] top-p / greedy tokens/s = {res['ratio']:.3f} (goal >= {1 / 1.2:.3f})")
    for mode in ("greedy", "top_p"):
        print(f"[{dtype}] old/new ms per {mode} step = {res[f'sort_{mode}_ms'] / res[f'ours_{mode}_ms']:.1f}")
    return res


def easydel_worker(dtype: str, head_scale: float) -> None:
    """Runs in EasyDeL's own venv: the same model shape, random weights with the same head scaling, its
    `generate` (greedy and top-p 0.9), best of 3 after a warm-up; prints one JSON line."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from transformers import GenerationConfig

    from easydel.modules.internlm2 import InternLM2Config, InternLM2ForCausalLM

    dt = jnp.dtype(dtype)
    model = InternLM2ForCausalLM(config=InternLM2Config(**MODEL, bias=False), dtype=dt, param_dtype=jnp.float32,
                                 rngs=nnx.Rngs(0))
    model.output.kernel.value = model.output.kernel.value * head_scale  # (a deprecation warning in flax 0.12)
    model.generation_config = GenerationConfig(pad_token_id=0, eos_token_id=-5, bos_token_id=1)
    ids = jnp.asarray(np.random.default_rng(0).integers(3, MODEL["vocab_size"], (BATCH, PROMPT)), jnp.int32)
    out = {}
    for mode, kw in (("greedy", dict(do_sample=False)), ("top_p", dict(do_sample=True, top_k=0, **TOP_P))):
        for n in (NEW, 8):
            def call():
                with model.mesh:
                    res = model.generate(ids, max_new_tokens=n, prng_key=jax.random.PRNGKey(0), **kw)
                return jax.block_until_ready(res.sequences)
            call()
            ts = []
            for _ in range(3):
                t = time.perf_counter()
                call()
                ts.append(time.perf_counter() - t)
            out[f"{mode}_{n}"] = min(ts)
    print(json.dumps(out))


def run_easydel(python: str, dtype: str, head_scale: float) -> dict[str, float] | None:
    try:
        proc = subprocess.run([python, __file__, "--easydel-worker", "--dtypes", dtype, "--head_scale",
                               str(head_scale)], capture_output=True, text=True, timeout=900)
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except Exception as e:  # noqa: BLE001 - a peer that fails to run is reported and skipped
        print(f"[{dtype}] EasyDeL skipped: {type(e).__name__}: {str(e)[:200]}")
        return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fp32 only, 3 rounds (baseline 1)")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--baseline_rounds", type=int, default=2, help="rounds that also time the sort sampler")
    ap.add_argument("--head_scale", type=float, default=30.0, help="output-head multiplier (1: random init)")
    ap.add_argument("--easydel", default=None, help="python of a venv with easydel==0.3.0 (a peer baseline)")
    ap.add_argument("--easydel-worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.easydel_worker:
        easydel_worker(args.dtypes, args.head_scale)
        return 0
    import jax

    dtypes = ["float32"] if args.quick else args.dtypes.split(",")
    rounds, baseline_rounds = (3, 1) if args.quick else (args.rounds, args.baseline_rounds)
    print(f"device: {jax.devices()[0].device_kind}; batch {BATCH}, prompt {PROMPT}, {NEW} new tokens; "
          f"{rounds} alternating rounds ({baseline_rounds} with the sort-based baseline)")
    results = {dt: run_dtype(dt, args.head_scale, rounds, baseline_rounds) for dt in dtypes}
    for dt, res in results.items():
        if args.easydel:
            ed = run_easydel(args.easydel, dt, args.head_scale)
            if ed:
                for mode in ("greedy", "top_p"):
                    ms = (ed[f"{mode}_{NEW}"] - ed[f"{mode}_8"]) / (NEW - 8) * 1e3
                    print(f"[{dt}] EasyDeL 0.3.0 generate {mode}: {BATCH * NEW / ed[f'{mode}_{NEW}']:.1f} tok/s, "
                          f"{ms:.2f} ms per step; ours/EasyDeL tok/s = "
                          f"{res[f'{mode}_tok_s'] / (BATCH * NEW / ed[f'{mode}_{NEW}']):.2f}")
    for dt, res in results.items():
        print(f"speedup_vs_sort_sampler[{dt}]={res['sort_top_p_ms'] / res['ours_top_p_ms']:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
