"""Where each output record goes: the shard layout shared by the local and the Beam runner.

An output of ``n`` records gets ``shard_count(n, records_per_shard) = max(1, ceil(n / records_per_shard))``
shards; a record goes to shard ``shard_index(id, count)`` -- a stable hash of its id (BLAKE2b, not Python's
salted ``hash``) modulo the count -- and each shard holds its records sorted by id. So a shard's content
depends only on the total count and on its own records: every shard can be written by a different worker
in parallel (Beam: one ``GroupByKey`` on (output, shard)) and the bytes equal the local run's.
``records_per_shard`` is the *average* shard size: hashing spreads records evenly, not exactly.
"""

from __future__ import annotations

import hashlib

# Output folders in manifest / stats order, with the formats each is written in (rejects: JSONL only, for
# reading by eye; the training outputs also as ArrayRecord for Grain).
OUTPUT_FORMATS: dict[str, tuple[str, ...]] = {
    "text": ("array_record", "jsonl"),
    "code": ("array_record", "jsonl"),
    "rejected": ("jsonl",),
}


def shard_count(n_records: int, records_per_shard: int) -> int:
    """Shards for an output of ``n_records``: at least one (possibly empty), so readers always find one."""
    if records_per_shard < 1:
        raise ValueError(f"records_per_shard must be >= 1, got {records_per_shard}")
    return max(1, -(-n_records // records_per_shard))


def shard_index(record_id: str, count: int) -> int:
    """The shard of a record: stable across processes, machines and Python versions."""
    digest = hashlib.blake2b(record_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % count


def shard_stem(prefix: str, index: int) -> str:
    """File name without the format suffix: ``text-00003`` (names unchanged from the sequential layout)."""
    return f"{prefix}-{index:05d}"
