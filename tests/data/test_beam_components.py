"""Distributed connected components (Beam, large-star / small-star) == union-find (`dedup.components`)."""

from __future__ import annotations

import random

import pytest

beam = pytest.importorskip("apache_beam")
from apache_beam.testing.util import assert_that, equal_to  # noqa: E402

from internlm2_jax.data import beam_components, dedup  # noqa: E402


def _union_find_labels(ids: list[str], edges: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Independent reference: (id, smallest id of its component) from the in-memory union-find."""
    order = sorted(ids)
    index = {k: i for i, k in enumerate(order)}
    roots = dedup.components(len(order), [(index[a], index[b]) for a, b in edges])
    return [(k, order[r]) for k, r in zip(order, roots)]


def _planted_graph(seed: int = 0) -> tuple[list[str], list[tuple[str, str]]]:
    """Clusters of sizes 2..60 (random spanning trees + extra edges), a 400-node chain, singletons.

    Ids are unpadded strings in shuffled order, so string order, numeric order and position all differ."""
    rng = random.Random(seed)
    n = 1500
    ids = [f"doc{i}" for i in rng.sample(range(10 * n), n)]
    pos = 0
    edges = []
    chain = ids[pos : pos + 400]  # consecutive links only: diameter 399, the worst case for propagation
    edges += list(zip(chain, chain[1:]))
    pos += 400
    while pos < n - 200:  # the last 200 stay singletons
        size = rng.choice([2, 2, 3, 5, 8, 20, 60])
        members = ids[pos : pos + size]
        pos += size
        for k in range(1, len(members)):
            edges.append((members[k], members[rng.randrange(k)]))  # a random tree ...
        for _ in range(size // 2):
            a, b = rng.sample(members, 2)
            edges.append((a, b))  # ... plus cycles and repeated edges
    edges.append((ids[0], ids[0]))  # a self-loop links nothing
    rng.shuffle(edges)
    return ids, edges


def _run_components(ids, edges, max_rounds=beam_components.DEFAULT_MAX_ROUNDS, expected=None):
    with beam.Pipeline("DirectRunner") as p:
        labels = ((p | "Ids" >> beam.Create(ids), p | "Edges" >> beam.Create(edges))
                  | beam_components.ConnectedComponents(max_rounds))
        assert_that(labels, equal_to(expected))


def test_components_equal_union_find_on_planted_graph():
    ids, edges = _planted_graph()
    expected = _union_find_labels(ids, edges)
    labels = dict(expected)
    assert max(sum(1 for v in labels.values() if v == c) for c in set(labels.values())) == 400  # the chain
    assert sum(1 for k, v in labels.items() if k == v) > 200  # singletons and cluster centres
    _run_components(ids, edges, expected=expected)


def test_chain_needs_rounds_and_too_few_fail_loudly():
    ids = [f"n{i:04d}" for i in range(300)]
    chain = list(zip(ids, ids[1:]))
    rounds = beam_components.rounds_to_converge(chain)
    assert 5 <= rounds <= 12, rounds  # ~log2(300); one pair is far too few
    with pytest.raises(Exception, match="not in star form"):
        _run_components(ids, chain, max_rounds=rounds - 1, expected=[])
    _run_components(ids, chain, max_rounds=rounds, expected=[(k, ids[0]) for k in ids])


def test_rounds_to_converge_grows_like_log_of_chain_length():
    counts = [beam_components.rounds_to_converge([(i, i + 1) for i in range(n - 1)]) for n in (16, 256, 4096)]
    assert counts == sorted(counts) and counts[-1] <= 14 < beam_components.DEFAULT_MAX_ROUNDS, counts


def test_edge_to_unknown_node_is_an_error():
    with pytest.raises(Exception, match="not in the node collection"):
        _run_components(["a"], [("a", "b")], max_rounds=1, expected=[])


def test_star_rounds_keep_stars_and_reject_other_shapes():
    assert sorted(beam_components.large_star(3, {1, 5, 7})) == [(5, 1), (7, 1)]
    assert sorted(beam_components.small_star(9, {4, 2})) == [(4, 2), (9, 2)]
    assert beam_components.star_label("b", {"a"}, set()) == "a"
    assert beam_components.star_label("a", set(), {"b", "c"}) == "a"
    with pytest.raises(beam_components.NotConverged):
        beam_components.star_label("b", {"a"}, {"c"})  # a path a-b-c is not a star
