"""Connected components of dedup graphs: union-find (one machine) vs the Beam large-star / small-star rounds.

Prints edges/s of both on the same graph (the Beam transform on the in-process DirectRunner, 1 core:
a pessimistic stand-in for one Dataflow/Flink/Spark worker), the edges each round shuffled (Beam
counters), and the rounds needed to converge on graphs of growing size, chains included.

Run: ``python -m experiments.bench_components [--nodes N] [--rounds_table]``.
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Sequence

from internlm2_jax.data import beam_components, dedup

Edge = tuple[str, str]


def dedup_like_graph(n_nodes: int, dup_rate: float = 0.3, chain: int = 1000, seed: int = 0) -> tuple[list[str], list[Edge]]:
    """Like ``bench_dedup.make_corpus``: each node is, with ``dup_rate``, a copy of a random earlier node
    (one edge to it); plus one ``chain``-node path. Ids are zero-padded strings in shuffled order."""
    rng = random.Random(seed)
    order = list(range(n_nodes))
    rng.shuffle(order)
    ids = [f"doc{i:010d}" for i in order]
    edges = [(ids[i], ids[rng.randrange(i)]) for i in range(1, n_nodes) if rng.random() < dup_rate]
    start = rng.randrange(max(1, n_nodes - chain))
    path = ids[start : start + chain]
    edges += list(zip(path, path[1:]))
    return ids, edges


def time_union_find(ids: Sequence[str], edges: Sequence[Edge]) -> float:
    """Seconds for `dedup.components` including the id -> index mapping (what a caller with string ids pays)."""
    t0 = time.perf_counter()
    index = {k: i for i, k in enumerate(sorted(ids))}
    dedup.components(len(index), [(index[a], index[b]) for a, b in edges])
    return time.perf_counter() - t0


def time_beam(ids: Sequence[str], edges: Sequence[Edge], max_rounds: int) -> tuple[float, list[int]]:
    """Seconds for `beam_components.ConnectedComponents` on the in-process DirectRunner, and the edges
    emitted per round (large-star + small-star)."""
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    t0 = time.perf_counter()
    p = beam.Pipeline(options=PipelineOptions(["--runner=DirectRunner", "--direct_num_workers=1"]))
    _ = ((p | "Ids" >> beam.Create(list(ids)), p | "Edges" >> beam.Create(list(edges)))
         | beam_components.ConnectedComponents(max_rounds) | beam.combiners.Count.Globally())
    result = p.run()
    result.wait_until_finish()
    seconds = time.perf_counter() - t0
    per_round = [0] * max_rounds
    for c in result.metrics().query()["counters"]:
        name = c.key.metric.name  # round<i>_large / round<i>_small
        if name.startswith("round"):
            per_round[int(name[5:].split("_")[0])] += c.committed
    return seconds, per_round


def rounds_table(sizes: Sequence[int] = (100, 1000, 10_000, 100_000)) -> list[tuple[str, int, int, int]]:
    """(graph, nodes, edges, rounds to converge) for sorted and shuffled chains and dedup-like graphs."""
    rows = []
    for n in sizes:
        chain = [(i, i + 1) for i in range(n - 1)]
        perm = list(range(n))
        random.Random(n).shuffle(perm)
        ids, edges = dedup_like_graph(n, chain=min(n, 1000))
        for name, g in (("chain, sorted ids", chain), ("chain, shuffled ids", [(perm[a], perm[b]) for a, b in chain]),
                        ("dedup-like (30% copies + 1000-chain)", edges)):
            rows.append((name, n, len(g), beam_components.rounds_to_converge(g)))
    return rows


def measure(n_nodes: int, max_rounds: int = beam_components.DEFAULT_MAX_ROUNDS) -> dict[str, float]:
    """Edges/s of union-find and of the Beam rounds on one dedup-like graph."""
    ids, edges = dedup_like_graph(n_nodes)
    t_uf = min(time_union_find(ids, edges) for _ in range(3))
    t_beam, per_round = time_beam(ids, edges, max_rounds)
    return {"nodes": n_nodes, "edges": len(edges), "rounds_needed": beam_components.rounds_to_converge(edges),
            "max_rounds": max_rounds, "union_find_edges_per_s": len(edges) / t_uf,
            "beam_edges_per_s": len(edges) / t_beam, "beam_seconds": t_beam,
            "beam_edge_rounds_per_s": sum(per_round) / t_beam, "beam_edges_per_round": per_round}


def print_measure(m: dict) -> None:
    print(f"components graph: nodes={m['nodes']} edges={m['edges']} rounds_needed={m['rounds_needed']} "
          f"max_rounds={m['max_rounds']} edges_emitted_per_round={m['beam_edges_per_round'][:6]}...")
    print(f"components union_find_edges_per_s={m['union_find_edges_per_s']:,.0f}")
    print(f"components beam_direct_runner_edges_per_s={m['beam_edges_per_s']:,.0f} "
          f"({m['beam_seconds']:.1f}s; {m['beam_edge_rounds_per_s']:,.0f} shuffled edges/s over all rounds)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=20_000)
    ap.add_argument("--rounds_table", action="store_true", help="also print rounds needed on growing graphs")
    args = ap.parse_args()
    print_measure(measure(args.nodes))
    if args.rounds_table:
        print("| graph | nodes | edges | rounds to converge |")
        print("|---|---|---|---|")
        for name, n, e, r in rounds_table():
            print(f"| {name} | {n:,} | {e:,} | {r} |")


if __name__ == "__main__":
    main()
