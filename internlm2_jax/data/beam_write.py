"""The Beam sink of the pipeline: output shards written in parallel, then one commit from their metadata.

Per output (``text``, ``code``, ``rejected``): a global count (one integer, a side input) gives the shard
count (`layout.shard_count`); each record is keyed by ``(output, layout.shard_index(id, count))`` and one
``GroupByKey`` brings each shard's records to one worker, which writes it into the run's staging folder with
`writers.write_shard` -- the function the local runner calls, so the bytes are the same -- and emits only
its `writers.Shard` metadata (path, records, bytes, SHA-256). The commit step (`pipeline.commit_outputs`)
then sees those few entries per shard, never a record.

Every shard index is also emitted once from the count, so empty shards (an empty output, or a shard no id
hashes to) are written like in the local run.
"""

from __future__ import annotations

import pathlib
from collections.abc import Iterator, Mapping
from typing import Any

import apache_beam as beam

from . import layout, writers
from .records import Record

_EMPTY = None  # marks a shard that must exist even if no record hashes to it


def _keyed(rec: Record, output: str, records_per_shard: int, n: int) -> tuple[tuple[str, int], Record]:
    return (output, layout.shard_index(rec["id"], layout.shard_count(n, records_per_shard))), rec


def _every_shard(n: int, output: str, records_per_shard: int) -> Iterator[tuple[tuple[str, int], None]]:
    for k in range(layout.shard_count(n, records_per_shard)):
        yield (output, k), _EMPTY


class _WriteShard(beam.DoFn):
    """Writes one grouped shard into the staging folder; emits its metadata (one `Shard` per format)."""

    def __init__(self, staging: str):
        self.staging = staging

    def process(self, kv: tuple[tuple[str, int], Any]) -> Iterator[writers.Shard]:
        (output, index), members = kv
        yield from writers.write_shard([r for r in members if r is not _EMPTY], self.staging, output, index)


def write_shards(outputs: Mapping[str, beam.PCollection], staging: str | pathlib.Path,
                 records_per_shard: int) -> beam.PCollection:
    """Records of each output (name -> PCollection) -> their shards written under ``staging/<name>/``;
    returns the PCollection of `writers.Shard` metadata (a few elements per shard)."""
    keyed = []
    for name, records in outputs.items():
        n = records | f"Count {name}" >> beam.combiners.Count.Globally()
        keyed.append(records | f"Key {name}" >> beam.Map(_keyed, name, records_per_shard, beam.pvalue.AsSingleton(n)))
        keyed.append(n | f"Shards of {name}" >> beam.FlatMap(_every_shard, name, records_per_shard))
    return (keyed | "AllShardKeys" >> beam.Flatten() | "ByShard" >> beam.GroupByKey()
            | "WriteShard" >> beam.ParDo(_WriteShard(str(staging))))
