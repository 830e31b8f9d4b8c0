"""Serving throughput: the continuous-batching OpenAI server vs one-at-a-time generation vs transformers.

    python -m experiments.bench_serve                  # 16 clients x 64 tokens, 3 alternating rounds
    python -m experiments.bench_serve --quick          # tiny sizes (the smoke test)

One random-weight model (the `tiny` preset widened to ~4M params, fp32) and a BPE tokenizer trained on the
project's docs. N clients each send one streaming `/v1/completions` request (prompts of 32-64 tokens, greedy,
`ignore_eos`, so every request yields exactly `--max-tokens` tokens). The same requests are served by:

    server      `serving.server` + `serving.engine`, uvicorn in a thread; the clients (httpx streams on one
                asyncio loop, `experiments.serve_load`) in a process of their own, as real clients are
    engine      diagnostic: the same engine fed directly (`Engine.submit`), no HTTP
    sequential  one at a time through `generate.generate_stream` (the CLI chat path), `stop_ids=()`
    hf_batch    `transformers.LlamaForCausalLM` of our `save_hf_llama` export (fp32, sdpa), all requests in one
                greedy `generate`, left-padded (transformers' best case for throughput; faster torch threads)
    hf_seq      the same, one request per `generate` call

Every path runs once before the timed rounds (compilation excluded); rounds alternate the paths' order (ABBA).
tokens/s = output tokens / the round's wall time. TTFT: from the round's start (all requests arrive together,
so one-at-a-time paths include the wait behind earlier requests) and from the request's own start. Per-token
latency: gaps between a request's streamed tokens (server: between SSE chunks with text, so a token completing
no character merges into the next gap). Last line: `speedup_vs_sequential=<x> speedup_vs_transformers=<y>`,
the server's tokens/s over sequential's and hf_batch's, best rounds.
"""

from __future__ import annotations

import argparse
import glob
import os
import statistics
import tempfile
import threading
import time
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

from internlm2_jax import Tokenizer, get_preset, init_params, save_hf_llama
from internlm2_jax.data.tokenizer_training import train_tokenizer
from internlm2_jax.generate import generate_stream
from internlm2_jax.model import decode_step, init_cache, param_count
from internlm2_jax.serving.background import BackgroundServer
from internlm2_jax.serving.engine import Engine, EngineConfig, SamplingParams
from internlm2_jax.serving.server import ServerConfig, create_app

from experiments.serve_load import LoadProcess


class Trace:
    """One request: its start, each token's arrival time, its output."""

    def __init__(self, start: Optional[float] = None):
        self.start, self.times, self.out = time.perf_counter() if start is None else start, [], []

    def tick(self, item: Any) -> None:
        self.times.append(time.perf_counter())
        self.out.append(item)


class Round:
    """One measured round of one path: `traces` of its requests, `tokens` generated in all, seconds."""

    def __init__(self, t0: float, tokens: int, traces: list[Trace], outputs: Optional[list] = None,
                 end: Optional[float] = None):
        self.wall, self.tokens, self.traces, self.outputs = (time.perf_counter() if end is None else end) - t0, tokens, traces, outputs
        self.tps = tokens / self.wall
        self.ttft, self.ttft_own = [tr.times[0] - t0 for tr in traces], [tr.times[0] - tr.start for tr in traces]
        self.gaps = [b - a for tr in traces for a, b in zip(tr.times, tr.times[1:])]


def build(args: argparse.Namespace, workdir: str):
    """(config, params, tokenizer, prompt texts, their ids as the server encodes them)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    files = [os.path.join(root, "README.md")] + sorted(glob.glob(os.path.join(root, "docs", "*.md")))
    text = "\n".join(open(f, encoding="utf-8").read() for f in files if os.path.exists(f))
    tok = Tokenizer(train_tokenizer([text], os.path.join(workdir, "tok"), vocab_size=args.vocab))
    config = get_preset("tiny", vocab_size=tok.vocab_size, hidden_size=args.hidden,
                        intermediate_size=args.hidden * 11 // 4, num_hidden_layers=args.layers,
                        num_attention_heads=max(4, args.hidden // 32), num_key_value_heads=max(2, args.hidden // 64),
                        max_position_embeddings=args.max_len, dtype="float32")
    params = nn.meta.unbox(init_params(config, jax.random.key(0)))
    words, texts, ids = text.split(), [], []
    for i in range(args.clients):  # prompt i: the most words from its own place that fit 36..64 tokens
        target, start = 36 + (i * 13) % 29, (i * 997) % max(1, len(words) - 400)
        enc = lambda n: tok.encode(" ".join(words[start:start + n]), add_bos=True, allow_special=False)  # noqa
        n = next(n for n in range(1, 400) if len(enc(n + 1)) > target)
        texts.append(" ".join(words[start:start + n]))
        ids.append(enc(n))
    return config, params, tok, texts, ids


class ServerPath:
    """Engine + OpenAI server (uvicorn in a thread, free loopback port); the clients run in their own process."""

    def __init__(self, config, params, tok, texts: list[str], ids: list[list[int]], args: argparse.Namespace):
        ec = EngineConfig(slots=args.slots or args.clients, max_len=args.max_len, max_queue=max(64, args.clients),
                          log_every_s=1e9)
        self.engine = Engine(config, params, ec, vocab_limit=tok.vocab_size).start()
        self.server = BackgroundServer(create_app(self.engine, tok, ServerConfig(model_name="bench")))
        self.ids, self.max_tokens, self.load = ids, args.max_tokens, LoadProcess(self.server.url)
        self.bodies = [{"model": "bench", "prompt": text, "max_tokens": args.max_tokens, "temperature": 0,
                        "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}
                       for text in texts]

    def run(self) -> Round:
        t0, t1, res = self.load.run(self.bodies)
        traces = []
        for r in res:
            traces.append(Trace(r.start))
            traces[-1].times, traces[-1].out = r.times, r.texts
        return Round(t0, sum(r.tokens for r in res), traces, end=t1)

    def direct(self) -> Round:
        """The `engine` diagnostic: every request submitted at once, tokens timed in the sinks."""
        done, t0 = threading.Semaphore(0), time.perf_counter()
        traces = [Trace(t0) for _ in self.ids]
        for tr, prompt in zip(traces, self.ids):
            self.engine.submit(prompt, SamplingParams(max_tokens=self.max_tokens, temperature=0.0),
                               lambda ev, tr=tr: tr.tick(ev.token) if ev.token is not None else done.release())
        for _ in traces:
            done.acquire()
        return Round(t0, sum(len(tr.out) for tr in traces), traces)

    def close(self) -> None:
        self.load.close()
        self.server.close()
        self.engine.stop()


def sequential(config, params, ids: list[list[int]], max_tokens: int, vocab: int) -> Round:
    """One request after another through `generate_stream` (the chat CLI's path)."""
    traces, t0 = [], time.perf_counter()
    for prompt in ids:
        traces.append(Trace())
        for t in generate_stream(config, params, prompt, max_new_tokens=max_tokens, stop_ids=(), vocab_limit=vocab):
            traces[-1].tick(t)
    return Round(t0, sum(len(tr.out) for tr in traces), traces)


class Clock(Trace, transformers.generation.streamers.BaseStreamer):
    """A `generate` streamer timing each `put`: the prompt's, then one per step (that step's tokens `[batch]`)."""

    def put(self, value: Any) -> None:
        self.tick(None)

    def end(self) -> None:
        self.times, self.out = self.times[1:], self.out[1:]  # the prompt's put is no token


class HFPath:
    """`transformers.LlamaForCausalLM` loaded from our `save_hf_llama` export; greedy `generate`."""

    def __init__(self, config, params, ids: list[list[int]], max_tokens: int, pad_id: int, workdir: str):
        save_hf_llama(config, params, os.path.join(workdir, "llama"))
        self.ids, self.max_tokens, self.pad = ids, max_tokens, pad_id
        self.model = transformers.LlamaForCausalLM.from_pretrained(
            os.path.join(workdir, "llama"), dtype=torch.float32, attn_implementation="sdpa").eval()
        gc = self.model.generation_config
        gc.do_sample, gc.temperature, gc.top_p, gc.top_k, gc.pad_token_id = False, None, None, None, pad_id

    def _generate(self, batch: list[list[int]]) -> tuple[list[list[int]], Trace]:
        p, clock = max(map(len, batch)), Clock()
        ids = torch.tensor([[self.pad] * (p - len(b)) + b for b in batch])  # left padding
        mask = torch.tensor([[0] * (p - len(b)) + [1] * len(b) for b in batch])
        with torch.inference_mode():
            out = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=self.max_tokens,
                                      min_new_tokens=self.max_tokens, streamer=clock)
        return out[:, p:].tolist(), clock

    def pick_threads(self) -> str:
        """Sets torch's intra-op threads to the faster of 1 and all cores for this model (batched generate)."""
        speed = {}
        for n in sorted({1, torch.get_num_threads(), os.cpu_count() or 1}):
            torch.set_num_threads(n)
            speed[n] = max(self.run(together=True).tps for _ in range(2))
        torch.set_num_threads(max(speed, key=speed.get))
        return ", ".join(f"{n} thread(s) {v:.0f} tok/s" for n, v in speed.items())

    def run(self, together: bool) -> Round:
        t0, traces, outs = time.perf_counter(), [], []
        for group in [self.ids] if together else [[p] for p in self.ids]:
            out, trace = self._generate(group)
            traces += [trace] * len(out)
            outs += out
        return Round(t0, sum(map(len, outs)), traces, outs)


def decode_step_ms(config, params, batch: int, max_len: int, reps: int = 20) -> float:
    """Diagnostic: one jitted `model.decode_step` alone (no sampling, no Python around it), ms."""
    step = jax.jit(lambda p, c, t: decode_step(config, p, {**c, "lengths": c["lengths"] - 1}, t),
                   donate_argnums=1)  # lengths - 1, then the step's + 1: every step writes position 48
    cache, tok, t = {**init_cache(config, batch, max_len), "lengths": jnp.full((batch,), 49)}, jnp.zeros(batch, int), 0
    for i in range(reps + 3):
        t = time.perf_counter() if i == 3 else t
        logits, cache = step(params, jax.block_until_ready(cache) if i == 3 else cache, tok)
    jax.block_until_ready((logits, cache))
    return (time.perf_counter() - t) / reps * 1e3


def _parse(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=16, help="concurrent requests (one prompt each)")
    ap.add_argument("--max-tokens", type=int, default=64, help="output tokens per request (ignore_eos)")
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds per path, in alternating order")
    ap.add_argument("--slots", type=int, default=None, help="engine slots (default: --clients)")
    ap.add_argument("--max-len", type=int, default=256, help="engine cache per slot (= the CLI path's here)")
    ap.add_argument("--hidden", type=int, default=256, help="model width (8/4 heads at 256)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=2048, help="tokenizer (and embedding) size")
    ap.add_argument("--no-hf-seq", action="store_true", help="skip transformers one request at a time")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: <= 4 clients x 8 tokens, 1 round")
    args = ap.parse_args(argv)
    if args.quick:
        vars(args).update(clients=min(args.clients, 4), max_tokens=min(args.max_tokens, 8), rounds=1, hidden=64,
                          layers=2, vocab=512, max_len=128)
    return args


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = _parse(argv)
    with tempfile.TemporaryDirectory() as workdir:
        config, params, tok, texts, ids = build(args, workdir)
        c, lens, n = config, [len(p) for p in ids], args.clients * args.max_tokens
        print(f"model: {param_count(c) / 1e6:.2f}M params, {c.num_hidden_layers} layers, hidden {c.hidden_size}, heads "
              f"{c.num_attention_heads}/{c.num_key_value_heads}, vocab {c.vocab_size}, fp32; {os.cpu_count()} cores\n"
              f"{args.clients} requests, prompts {min(lens)}-{max(lens)} tokens, {args.max_tokens} new tokens each "
              f"(greedy, ignore_eos); engine slots {args.slots or args.clients}, max_len {args.max_len}")
        server = ServerPath(config, params, tok, texts, ids, args)
        hf = HFPath(config, params, ids, args.max_tokens, tok.pad_id, workdir)
        print(f"transformers threads: {hf.pick_threads()} -> {torch.get_num_threads()} (the faster one is used)")
        paths: dict[str, Callable[[], Round]] = {
            "server": server.run, "engine": server.direct,
            "sequential": lambda: sequential(config, params, ids, args.max_tokens, tok.vocab_size),
            "hf_batch": lambda: hf.run(together=True)}
        if not args.no_hf_seq:
            paths["hf_seq"] = lambda: hf.run(together=False)
        t = time.perf_counter()
        warm = {name: fn() for name, fn in paths.items()}  # compiles every prompt bucket and the steps
        print(f"warm-up (incl. XLA compilation; excluded from the timings) {time.perf_counter() - t:.1f} s")
        seq, out = [tr.out for tr in warm["sequential"].traces], lambda k: [tr.out for tr in warm[k].traces]
        same = [sum(map(lambda a, b: a == b, x, y)) for x, y in (([tok.decode(o, skip_special=True) for o in seq],
                ["".join(o) for o in out("server")]), (seq, out("engine")), (seq, warm["hf_batch"].outputs))]
        print(f"greedy outputs equal to sequential's: server {same[0]}, engine {same[1]}, hf_batch {same[2]} of "
              f"{len(ids)} (near-tied logits of a random model may flip a few)")
        rounds: dict[str, list[Round]] = {k: [] for k in paths}
        for i in range(args.rounds):
            for name in list(paths) if i % 2 == 0 else list(paths)[::-1]:
                r = paths[name]()
                assert r.tokens == n, f"{name}: {r.tokens} tokens, expected {n}"
                rounds[name].append(r)
                print(f"round {i + 1}/{args.rounds} {name:<10} {r.tps:9.1f} tok/s  wall {r.wall:6.2f} s", flush=True)
        server.close()
        for b in sorted({1, args.slots or args.clients}):
            print(f"diagnostic: jitted decode_step alone, batch {b:>3}: "
                  f"{decode_step_ms(config, params, b, args.max_len):.2f} ms/step")

    print(f"\n{'path':<11}{'tok/s best':>11}{'median':>9}{'TTFT p50':>10}{'p99':>8}{'own p50':>9}{'p99':>8}"
          f"{'tok p50':>9}{'p99':>8}   (ms; latencies of the best round)")
    best = {k: max(v, key=lambda r: r.tps) for k, v in rounds.items()}
    ms = lambda xs, q: 1e3 * float(np.percentile(xs, q)) if len(xs) else float("nan")  # noqa: E731
    for name, rs in rounds.items():
        b = best[name]
        print(f"{name:<11}{b.tps:11.1f}{statistics.median(r.tps for r in rs):9.1f}{ms(b.ttft, 50):10.1f}"
              f"{ms(b.ttft, 99):8.1f}{ms(b.ttft_own, 50):9.1f}{ms(b.ttft_own, 99):8.1f}{ms(b.gaps, 50):9.2f}"
              f"{ms(b.gaps, 99):8.2f}")
    med = lambda base: statistics.median(s.tps / r.tps for s, r in zip(rounds["server"], rounds[base]))  # noqa
    print("server's median per-round ratios: " + ", ".join(f"vs {k} {med(k):.2f}" for k in rounds if k != "server"))
    print(f"speedup_vs_sequential={best['server'].tps / best['sequential'].tps:.3f} "
          f"speedup_vs_transformers={best['server'].tps / best['hf_batch'].tps:.3f}")


if __name__ == "__main__":
    main()
