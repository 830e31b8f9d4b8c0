"""Benchmark our vectorized MinHash-LSH against ``datasketch.MinHashLSH`` (same data, same params).

Both sides are timed end to end: shingling + signatures + index + query. Recall is measured
against the exact set of pairs with shingle Jaccard >= threshold (found through an inverted index
over shingles, so no qualifying pair is missed). Last line:
``speedup_vs_datasketch=<float> recall=<float>`` (recall of our implementation; datasketch's recall
is printed above it).

Also printed, for the cost projection in docs/benchmarks.md: signature docs/s on one core, batched (the
local run, and the Beam ``_BandKeys`` DoFn on ``BatchElements``) and one document per call; the Beam LSH
front (``beam_pipeline.lsh_edges``) on the DirectRunner; candidate
edges per document of this corpus; and the components step's edges/s, union-find vs the distributed Beam
rounds on the DirectRunner (``experiments.bench_components``).

Each side runs ``--repeats`` times, alternating; the medians are compared.

Run: ``python -m experiments.bench_dedup [--docs N] [--words W] [--repeats R]``.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections import defaultdict
from itertools import combinations

from experiments import bench_components
from internlm2_jax.data import dedup


def make_corpus(n_docs: int, words: int, seed: int = 0) -> list[str]:
    """Random-word documents; ~30% are edited copies of earlier ones (varied edit rates)."""
    rng = random.Random(seed)
    vocab = [f"tok{i}" for i in range(50000)]
    docs: list[list[str]] = []
    for _ in range(n_docs):
        if docs and rng.random() < 0.3:
            src = list(rng.choice(docs))
            for pos in rng.sample(range(len(src)), rng.randint(0, words // 10)):
                src[pos] = rng.choice(vocab)
            docs.append(src)
        else:
            docs.append([rng.choice(vocab) for _ in range(words)])
    return [" ".join(d) for d in docs]


def _grams(text: str, n: int) -> set[str]:
    toks = dedup.shingle_tokens(text)
    n = min(n, len(toks))
    return {" ".join(toks[i : i + n]) for i in range(len(toks) - n + 1)}


def exact_pairs(texts: list[str], threshold: float, n: int) -> set[tuple[int, int]]:
    """All pairs with exact shingle Jaccard >= threshold (inverted index over shingles)."""
    sets = [_grams(t, n) for t in texts]
    index: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(sets):
        for g in s:
            index[g].append(i)
    cand = {p for ids in index.values() if len(ids) > 1 for p in combinations(ids, 2)}
    return {(i, j) for i, j in cand if len(sets[i] & sets[j]) / len(sets[i] | sets[j]) >= threshold}


def run_ours(texts: list[str], threshold: float, num_perm: int, n: int) -> list[int]:
    return dedup.near_duplicate_clusters(texts, threshold=threshold, num_perm=num_perm, ngram=n)


def run_datasketch(texts: list[str], threshold: float, num_perm: int, n: int) -> set[tuple[int, int]]:
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, weights=(0.4, 0.6))  # our default weights
    mhs = []
    for i, t in enumerate(texts):
        m = MinHash(num_perm=num_perm, seed=1)
        m.update_batch([g.encode("utf-8") for g in _grams(t, n)])  # fastest datasketch API
        lsh.insert(i, m)
        mhs.append(m)
    pairs = set()
    for i, m in enumerate(mhs):
        for j in lsh.query(m):
            if j != i:
                pairs.add((min(i, j), max(i, j)))
    return pairs


def signature_rates(texts: list[str], num_perm: int, n: int, threshold: float) -> tuple[float, float]:
    """Docs/s of shingles + signatures + band keys on one core: batched, and one document per call."""
    hasher = dedup.MinHasher(num_perm)
    bands, rows = dedup.optimal_bands(threshold, num_perm)

    def keys(batch: list[str]) -> None:
        x, counts = dedup.batch_shingle_hashes(batch, n)
        dedup.band_keys(hasher.signatures_flat(x, counts), bands, rows)

    t0 = time.perf_counter()
    keys(texts)
    t_batched = time.perf_counter() - t0
    t0 = time.perf_counter()
    for t in texts:
        keys([t])
    return len(texts) / t_batched, len(texts) / (time.perf_counter() - t0)


def beam_lsh_docs_per_s(texts: list[str], repeats: int = 2) -> float:
    """Docs/s of the Beam pipeline's LSH front (batches -> band keys -> bucket shuffle -> verified edges) on
    the in-process DirectRunner (one core): the time beyond a pipeline that only builds the records (best of
    ``repeats`` each; start-up and element encoding cancel out)."""
    import apache_beam as beam

    from internlm2_jax.data import beam_pipeline, pipeline

    def seconds(with_front: bool) -> float:
        t0 = time.perf_counter()
        with beam.Pipeline("DirectRunner") as p:
            recs = (p | beam.Create(range(len(texts)))
                    | beam.Map(lambda i, ts: {"id": f"d{i:08d}", "text": ts[i]}, texts))
            out = beam_pipeline.lsh_edges(recs, pipeline.PipelineConfig()) if with_front else recs
            _ = out | beam.combiners.Count.Globally()
        return time.perf_counter() - t0

    base, front = zip(*[(seconds(False), seconds(True)) for _ in range(repeats)])
    return len(texts) / max(1e-9, min(front) - min(base))


def candidate_edges_per_doc(texts: list[str], threshold: float, num_perm: int, n: int) -> tuple[float, float]:
    """LSH candidate edges per document (bucket stars, as the Beam pipeline emits them): before / after
    the signature verification."""
    dd = dedup.StreamingDeduper(threshold=threshold, num_perm=num_perm, ngram=n)
    dd.add(texts)
    keys, sigs = dd._keys[0], dd._sigs[0]
    cand = dedup.band_edges(keys, dd._valid[0])
    kept = dedup.verify_edges(cand, sigs, dd.min_estimate)
    return len(cand) / len(texts), len(kept) / len(texts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=4000)
    ap.add_argument("--words", type=int, default=300)
    ap.add_argument("--threshold", type=float, default=0.7)
    ap.add_argument("--num_perm", type=int, default=128)
    ap.add_argument("--ngram", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each (median reported)")
    ap.add_argument("--component_nodes", type=int, default=20_000, help="nodes of the components benchmark graph")
    args = ap.parse_args()

    texts = make_corpus(args.docs, args.words)
    truth = exact_pairs(texts, args.threshold, args.ngram)
    dedup.optimal_bands(args.threshold, args.num_perm)  # parameter search is cached, not timed twice
    run_ours(texts[:50], args.threshold, args.num_perm, args.ngram)  # warm-up

    t_ours_all, t_ds_all = [], []
    for _ in range(args.repeats):  # alternate the two; report medians
        t0 = time.perf_counter()
        cid = run_ours(texts, args.threshold, args.num_perm, args.ngram)
        t_ours_all.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        ds_pairs = run_datasketch(texts, args.threshold, args.num_perm, args.ngram)
        t_ds_all.append(time.perf_counter() - t0)
    t_ours, t_ds = statistics.median(t_ours_all), statistics.median(t_ds_all)

    recall_ours = sum(cid[i] == cid[j] for i, j in truth) / max(1, len(truth))
    recall_ds = sum(p in ds_pairs for p in truth) / max(1, len(truth))
    print(f"docs={len(texts)} words/doc={args.words} true_pairs(J>={args.threshold})={len(truth)} "
          f"bands,rows={dedup.optimal_bands(args.threshold, args.num_perm)}")
    print(f"ours:       {t_ours:.3f}s  {len(texts) / t_ours:,.0f} docs/s  recall={recall_ours:.4f}")
    print(f"datasketch: {t_ds:.3f}s  {len(texts) / t_ds:,.0f} docs/s  recall={recall_ds:.4f}")
    batched, per_doc = signature_rates(texts, args.num_perm, args.ngram, args.threshold)
    print(f"signatures+band keys, 1 core: batched {batched:,.0f} docs/s, one doc per call {per_doc:,.0f} docs/s")
    print(f"beam LSH front (band keys + bucket shuffle + edges), DirectRunner, 1 core: "
          f"{beam_lsh_docs_per_s(texts):,.0f} docs/s")
    before, after = candidate_edges_per_doc(texts, args.threshold, args.num_perm, args.ngram)
    print(f"candidate edges per doc: {before:.3f} (LSH) -> {after:.3f} (verified)")
    bench_components.print_measure(bench_components.measure(args.component_nodes))
    print(f"speedup_vs_datasketch={t_ds / t_ours:.2f} recall={recall_ours:.4f}")


if __name__ == "__main__":
    main()
