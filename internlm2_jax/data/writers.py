"""Sharded outputs: ArrayRecord (JSON bytes per record) and JSONL, both readable by Grain.

``grain.sources.ArrayRecordDataSource(paths)`` yields the JSON bytes of each record;
:func:`read_jsonl_shard` reads the JSONL twins. Which record goes to which shard is :mod:`.layout`;
:func:`write_shard` writes one shard (the unit both runners write, in parallel under Beam) and
:func:`write_shards` all shards of one output in this process. The pipeline writes shards into a staging
folder and commits them with a manifest (:mod:`.output`), so a reader can tell complete output from a
killed run's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import uuid
from collections.abc import Iterable, Sequence

from . import layout
from .records import Record, to_json_bytes

FORMATS = ("array_record", "jsonl")


@dataclasses.dataclass(frozen=True)
class Shard:
    """One written shard file: what the manifest lists about it (small: the Beam commit step gathers these,
    never records)."""

    output: str  # output folder name: text, code or rejected
    path: str
    records: int
    bytes: int
    sha256: str


def file_digest(path: str | pathlib.Path) -> str:
    """SHA-256 of a file; also flushes it to disk (every shard is durable before the commit renames)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
        os.fsync(f.fileno())
    return h.hexdigest()


def _open(path: pathlib.Path, fmt: str) -> object:
    if fmt == "array_record":
        from array_record.python.array_record_module import ArrayRecordWriter

        return ArrayRecordWriter(str(path), "group_size:1")
    return open(path, "wb")


def write_shard(records: Iterable[Record], root: str | pathlib.Path, output: str, index: int,
                formats: Sequence[str] | None = None) -> list[Shard]:
    """Write ``records`` (sorted here by id) as shard ``index`` of ``output``:
    ``{root}/{output}/{output}-{index:05d}.{fmt}`` for each format (default: `layout.OUTPUT_FORMATS`).

    Each file is written under a temporary name, checksummed and renamed: a retried or speculative Beam
    worker writing the same shard again can only replace it with the same complete bytes.
    """
    formats = tuple(layout.OUTPUT_FORMATS[output] if formats is None else formats)
    unknown = set(formats) - set(FORMATS)
    if unknown:
        raise ValueError(f"unknown output formats {sorted(unknown)}; expected a subset of {FORMATS}")
    out = pathlib.Path(root) / output
    out.mkdir(parents=True, exist_ok=True)
    stem = layout.shard_stem(output, index)
    tmp = {fmt: out / f".{stem}.{fmt}.tmp-{uuid.uuid4().hex[:8]}" for fmt in formats}
    handles: dict[str, object] = {}
    n = 0
    try:
        handles = {fmt: _open(path, fmt) for fmt, path in tmp.items()}
        for rec in sorted(records, key=lambda r: r["id"]):
            data = to_json_bytes(rec)
            if "array_record" in handles:
                handles["array_record"].write(data)
            if "jsonl" in handles:
                handles["jsonl"].write(data + b"\n")
            n += 1
        for h in handles.values():
            h.close()
        handles = {}
        shards = []
        for fmt, path in tmp.items():
            final = out / f"{stem}.{fmt}"
            shards.append(Shard(output, str(final), n, path.stat().st_size, file_digest(path)))
            os.replace(path, final)
        return shards
    except BaseException:
        for h in handles.values():  # no open handles nor temp files left behind
            h.close()
        for path in tmp.values():
            path.unlink(missing_ok=True)
        raise


def write_shards(records: Iterable[Record], root: str | pathlib.Path, output: str, *,
                 records_per_shard: int = 10_000, formats: Sequence[str] | None = None) -> list[Shard]:
    """Every shard of one output, in this process (the layout of :mod:`.layout`; always at least one,
    possibly empty, shard per format so downstream readers find it)."""
    records = list(records)
    count = layout.shard_count(len(records), records_per_shard)
    by_shard: list[list[Record]] = [[] for _ in range(count)]
    for rec in records:
        by_shard[layout.shard_index(rec["id"], count)].append(rec)
    return [s for k, members in enumerate(by_shard) for s in write_shard(members, root, output, k, formats)]


def read_jsonl_shard(path: str | pathlib.Path) -> list[Record]:
    """All records of one JSONL shard."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def read_array_record_shards(paths: Sequence[str]) -> list[Record]:
    """All records of ArrayRecord shards, read through Grain's data source."""
    import grain

    src = grain.sources.ArrayRecordDataSource(list(paths))
    return [json.loads(src[i]) for i in range(len(src))]
