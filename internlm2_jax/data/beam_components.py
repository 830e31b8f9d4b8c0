"""Connected components as a distributed Beam computation: no step holds the graph on one worker.

Algorithm: alternating *large-star* / *small-star* rounds (Kiveris et al., "Connected Components in
MapReduce and Beyond", SoCC 2014; the same rounds Spark MinHash dedup pipelines run). Every round keys the
edges by node, groups them (one shuffle) and lets each node rewire its neighbourhood to the smallest node
it sees (:func:`large_star`, :func:`small_star`). Rounds never change which nodes are connected, and the
fixpoint is one *star* per component whose centre is the component's smallest node. The label of a node
is that centre, i.e. exactly what `dedup.components` (union-find, the single-machine fast path) gives.

Convergence: a Beam graph is static, so ``max_rounds`` (large-star + small-star) pairs are unrolled into
it. The final step groups the last edges by node (together with the node list, so it also yields the
labels) and checks star form: a node has at most one smaller neighbour, and a node with a smaller
neighbour has no larger one. Anything else raises :class:`NotConverged` and fails the pipeline: labels
are never silently wrong. Rounds after the fixpoint are no-ops (one shuffle of the ~one edge per
non-centre node each). Rounds observed (:func:`rounds_to_converge`): a sorted 100,000-node chain needs
~log2(length) pairs; see docs/benchmarks.md.

Node ids are any totally ordered, picklable values (record ids: strings).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Iterator
from typing import Any

import apache_beam as beam

Edge = tuple[Any, Any]
DEFAULT_MAX_ROUNDS = 24  # (large, small) pairs; a 1e5-node chain in sorted or shuffled order needs <= 17
_NS = "connected_components"


class NotConverged(RuntimeError):
    """The unrolled rounds did not reach star form: more rounds are needed."""


def large_star(node: Hashable, neighbours: set) -> Iterator[Edge]:
    """Link each larger neighbour of ``node`` to the smallest of ``node`` and its neighbours."""
    smallest = min(min(neighbours), node)
    for v in neighbours:
        if v > node:
            yield v, smallest


def small_star(node: Hashable, smaller: set) -> Iterator[Edge]:
    """``smaller``: the neighbours below ``node``; link ``node`` and each of them to the smallest."""
    smallest = min(smaller)
    yield node, smallest
    for v in smaller:
        if v != smallest:
            yield v, smallest


def star_label(node: Hashable, smaller: set, larger: set) -> Hashable:
    """Component label of ``node`` once the edges are stars; raises :class:`NotConverged` otherwise."""
    if len(smaller) > 1 or (smaller and larger):
        raise NotConverged(f"connected components not in star form at node {node!r} ({len(smaller)} smaller, "
                           f"{len(larger)} larger neighbours): raise max_rounds")
    return next(iter(smaller)) if smaller else node


def _both_directions(edge: Edge) -> Iterator[Edge]:
    a, b = edge
    if a != b:  # a self-loop links nothing
        yield a, b
        yield b, a


def _down(edge: Edge) -> Iterator[Edge]:
    """(larger endpoint, smaller endpoint)."""
    a, b = edge
    if a != b:
        yield (a, b) if a > b else (b, a)


def _counted(label: str, edges: Iterator[Edge]) -> Iterator[Edge]:
    """Pass ``edges`` through, counting them in the ``connected_components/<label>`` counter."""
    n = 0
    for e in edges:
        n += 1
        yield e
    beam.metrics.Metrics.counter(_NS, label).inc(n)


class _StarRound(beam.PTransform):
    """One large-star and one small-star step (two shuffles)."""

    def __init__(self, index: int):
        super().__init__()
        self.index = index

    def expand(self, edges: beam.PCollection) -> beam.PCollection:
        i = self.index
        large = (edges | "BothWays" >> beam.FlatMap(_both_directions) | "ByNode" >> beam.GroupByKey()
                 | "LargeStar" >> beam.FlatMap(lambda kv: _counted(f"round{i}_large", large_star(kv[0], set(kv[1])))))
        return (large | "Down" >> beam.FlatMap(_down) | "ByLarger" >> beam.GroupByKey()
                | "SmallStar" >> beam.FlatMap(lambda kv: _counted(f"round{i}_small", small_star(kv[0], set(kv[1])))))


def _label(kv: tuple[Hashable, Iterable[tuple[str, Any]]]) -> Iterator[tuple[Hashable, Hashable]]:
    node, tagged = kv
    smaller, larger, known = set(), set(), False
    for tag, other in tagged:
        if tag == "id":
            known = True
        elif tag == "smaller":
            smaller.add(other)
        else:
            larger.add(other)
    label = star_label(node, smaller, larger)
    if not known:
        raise ValueError(f"an edge names {node!r}, which is not in the node collection")
    yield node, label


def _tag_edge(edge: Edge) -> Iterator[tuple[Hashable, tuple[str, Any]]]:
    for big, small in _down(edge):
        yield big, ("smaller", small)
        yield small, ("larger", big)


class ConnectedComponents(beam.PTransform):
    """``(nodes, edges) -> (node, label)`` for every node; label = the smallest node of its component.

    ``nodes``: a PCollection of unique node ids; ``edges``: a PCollection of ``(a, b)`` pairs of them.
    """

    def __init__(self, max_rounds: int = DEFAULT_MAX_ROUNDS):
        super().__init__()
        if max_rounds < 1:
            raise ValueError(f"max_rounds must be >= 1, got {max_rounds}")
        self.max_rounds = max_rounds

    def expand(self, pcolls: tuple[beam.PCollection, beam.PCollection]) -> beam.PCollection:
        nodes, edges = pcolls
        for i in range(self.max_rounds):
            edges = edges | f"Round{i}" >> _StarRound(i)
        tagged = (nodes | "TagNodes" >> beam.Map(lambda n: (n, ("id", None))),
                  edges | "TagEdges" >> beam.FlatMap(_tag_edge))
        return tagged | "AllTags" >> beam.Flatten() | "ByNodeFinal" >> beam.GroupByKey() | "Label" >> beam.FlatMap(_label)


def _star_round_local(edges: set[Edge]) -> set[Edge]:
    """One round on one machine (the reference the Beam rounds implement), for round counting."""
    nbrs: dict[Hashable, set] = {}
    for e in edges:
        for a, b in _both_directions(e):
            nbrs.setdefault(a, set()).add(b)
    large = {e for u, vs in nbrs.items() for e in large_star(u, vs)}
    smaller: dict[Hashable, set] = {}
    for e in large:
        for big, small in _down(e):
            smaller.setdefault(big, set()).add(small)
    return {e for u, vs in smaller.items() for e in small_star(u, vs)}


def _is_star_form(edges: set[Edge]) -> bool:
    smaller: dict[Hashable, set] = {}
    larger: dict[Hashable, set] = {}
    for e in edges:
        for big, small in _down(e):
            smaller.setdefault(big, set()).add(small)
            larger.setdefault(small, set()).add(big)
    return all(len(s) == 1 and node not in larger for node, s in smaller.items())


def rounds_to_converge(edges: Iterable[Edge], limit: int = 200) -> int:
    """(large, small) round pairs until star form, on one machine; raises :class:`NotConverged` past ``limit``."""
    current = {e for e in edges if e[0] != e[1]}
    for rounds in range(limit + 1):
        if _is_star_form(current):
            return rounds
        current = _star_round_local(current)
    raise NotConverged(f"no star form after {limit} rounds")
