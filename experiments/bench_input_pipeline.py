"""Input-pipeline throughput on the embedded stdlib corpus vs. the train step's token demand.

    python -m experiments.bench_input_pipeline [--train_tokens_per_s 2200] [--seconds 8]

Builds (or reuses) the stdlib corpus and a 4096-piece tokenizer under --cache_dir, then times the
full pipeline (read -> tokenize -> chunk -> first-fit pack -> batch) for each --read_threads
setting and prints packed tokens/s of this host, packing density and the ratio to the demand.
"""

from __future__ import annotations

import argparse
import time

from internlm2_jax.input import InputConfig, make_pretrain_iterator
from internlm2_jax.input.stdlib_corpus import build_stdlib_corpus, default_cache_dir, ensure_tokenizer
from internlm2_jax.tokenizer import Tokenizer


def measure(cfg: InputConfig, tok: Tokenizer, seconds: float) -> dict[str, float]:
    """Real (loss_mask) tokens/s, slot tokens/s and density over ~`seconds` after 2 warmup steps."""
    it = make_pretrain_iterator(cfg, tokenizer=tok, shard_index=0, shard_count=1)
    for _ in range(2):
        next(it)
    real = slots = steps = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        b = next(it)
        real += int(b["loss_mask"].sum())
        slots += b["tokens"].size
        steps += 1
    dt = time.perf_counter() - t0
    return {"tok_s": real / dt, "slot_s": slots / dt, "density": real / max(slots, 1),
            "steps_s": steps / dt}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train_tokens_per_s", type=float, default=2200.0,
                   help="tokens/s one train step consumes per host (tiny model, CPU)")
    p.add_argument("--seq_len", type=int, default=512)
    p.add_argument("--global_batch_size", type=int, default=8)
    p.add_argument("--vocab_size", type=int, default=4096)
    p.add_argument("--read_threads", type=int, nargs="+", default=[0, 2])
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--cache_dir", default=default_cache_dir())
    a = p.parse_args()

    t = time.perf_counter()
    corpus = build_stdlib_corpus(a.cache_dir)
    t_corpus = time.perf_counter() - t
    t = time.perf_counter()
    tok = Tokenizer(ensure_tokenizer(corpus, a.vocab_size, a.cache_dir))
    t_tok = time.perf_counter() - t
    print(f"corpus {corpus} ({t_corpus:.1f}s), tokenizer vocab {tok.vocab_size} ({t_tok:.1f}s)")
    print(f"seq_len {a.seq_len}, global batch {a.global_batch_size}, 1 process, "
          f"train demand {a.train_tokens_per_s:.0f} tok/s")
    for threads in a.read_threads:
        cfg = InputConfig(sources={"stdlib": f"jsonl:{corpus}/{{split}}-*.jsonl"},
                          seq_len=a.seq_len, global_batch_size=a.global_batch_size,
                          read_threads=threads)
        r = measure(cfg, tok, a.seconds)
        print(f"read_threads={threads}: {r['tok_s']:,.0f} packed tok/s/host "
              f"({r['slot_s']:,.0f} slots/s, density {r['density']:.3f}, "
              f"{r['steps_s']:.1f} batches/s) = {r['tok_s'] / a.train_tokens_per_s:,.1f}x demand")


if __name__ == "__main__":
    main()
