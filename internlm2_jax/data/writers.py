"""Sharded outputs: ArrayRecord (JSON bytes per record) and JSONL, both readable by Grain.

``grain.sources.ArrayRecordDataSource(paths)`` yields the JSON bytes of each record;
:func:`read_jsonl_shard` reads the JSONL twins. The pipeline writes shards into a staging folder and
commits them with a manifest (:mod:`.output`), so a reader can tell complete output from a killed run's.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Iterable, Sequence

from .records import Record, to_json_bytes

FORMATS = ("array_record", "jsonl")


@dataclasses.dataclass(frozen=True)
class Shard:
    """One written shard file and how many records it holds."""

    path: str
    records: int


def write_shards(records: Iterable[Record], out_dir: str | pathlib.Path, prefix: str, *,
                 records_per_shard: int = 10_000, formats: Sequence[str] = FORMATS) -> list[Shard]:
    """Write records into ``{out_dir}/{prefix}-{k:05d}.{array_record,jsonl}``; returns the shards.

    Always writes at least one (possibly empty) shard per format so downstream readers find it.
    """
    unknown = set(formats) - set(FORMATS)
    if unknown:
        raise ValueError(f"unknown output formats {sorted(unknown)}; expected a subset of {FORMATS}")
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shards: list[Shard] = []
    shard, n = 0, 0

    def open_shard(k: int) -> dict:
        w: dict = {}
        if "array_record" in formats:
            from array_record.python.array_record_module import ArrayRecordWriter

            w["array_record"] = ArrayRecordWriter(str(out / f"{prefix}-{k:05d}.array_record"), "group_size:1")
        if "jsonl" in formats:
            w["jsonl"] = open(out / f"{prefix}-{k:05d}.jsonl", "wb")
        return w

    def close(w: dict, k: int, count: int) -> None:
        for fmt, v in w.items():
            v.close()
            shards.append(Shard(str(out / f"{prefix}-{k:05d}.{fmt}"), count))

    writers = open_shard(shard)
    try:
        for rec in records:
            if n == records_per_shard:
                close(writers, shard, n)
                shard, n = shard + 1, 0
                writers = open_shard(shard)
            data = to_json_bytes(rec)
            if "array_record" in writers:
                writers["array_record"].write(data)
            if "jsonl" in writers:
                writers["jsonl"].write(data + b"\n")
            n += 1
    except BaseException:
        for v in writers.values():  # no open handles left behind; the staging folder is discarded
            v.close()
        raise
    close(writers, shard, n)
    return shards


def read_jsonl_shard(path: str | pathlib.Path) -> list[Record]:
    """All records of one JSONL shard."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def read_array_record_shards(paths: Sequence[str]) -> list[Record]:
    """All records of ArrayRecord shards, read through Grain's data source."""
    import grain

    src = grain.sources.ArrayRecordDataSource(list(paths))
    return [json.loads(src[i]) for i in range(len(src))]
