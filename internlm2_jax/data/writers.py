"""Sharded outputs: ArrayRecord (JSON bytes per record) and JSONL, both readable by Grain.

``grain.sources.ArrayRecordDataSource(paths)`` yields the JSON bytes of each record;
:func:`read_jsonl_shard` reads the JSONL twins.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Iterable, Sequence

from .records import Record, to_json_bytes

FORMATS = ("array_record", "jsonl")


def write_shards(records: Iterable[Record], out_dir: str | pathlib.Path, prefix: str, *,
                 records_per_shard: int = 10_000, formats: Sequence[str] = FORMATS) -> list[str]:
    """Write records into ``{out_dir}/{prefix}-{k:05d}.{array_record,jsonl}``; returns the paths.

    Always writes at least one (possibly empty) shard per format so downstream readers find it.
    """
    unknown = set(formats) - set(FORMATS)
    if unknown:
        raise ValueError(f"unknown output formats {sorted(unknown)}; expected a subset of {FORMATS}")
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: list[str] = []
    shard, n, writers = 0, 0, None

    def open_shard(k: int) -> dict:
        w: dict = {}
        if "array_record" in formats:
            from array_record.python.array_record_module import ArrayRecordWriter

            p = out / f"{prefix}-{k:05d}.array_record"
            w["array_record"] = ArrayRecordWriter(str(p), "group_size:1")
            paths.append(str(p))
        if "jsonl" in formats:
            p = out / f"{prefix}-{k:05d}.jsonl"
            w["jsonl"] = open(p, "wb")
            paths.append(str(p))
        return w

    def close(w: dict) -> None:
        for v in w.values():
            v.close()

    writers = open_shard(shard)
    for rec in records:
        if n == records_per_shard:
            close(writers)
            shard, n = shard + 1, 0
            writers = open_shard(shard)
        data = to_json_bytes(rec)
        if "array_record" in writers:
            writers["array_record"].write(data)
        if "jsonl" in writers:
            writers["jsonl"].write(data + b"\n")
        n += 1
    close(writers)
    return paths


def read_jsonl_shard(path: str | pathlib.Path) -> list[Record]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def read_array_record_shards(paths: Sequence[str]) -> list[Record]:
    """All records of ArrayRecord shards, read through Grain's data source."""
    import grain

    src = grain.sources.ArrayRecordDataSource(list(paths))
    return [json.loads(src[i]) for i in range(len(src))]
