"""Batching tokenized conversations for SFT: packed rows (segment ids) or length buckets (padding).

A batch is `{tokens, segment_ids, positions, loss_mask}`, each int32 `[B, S]`, in the train step's
convention: `loss_mask[t] = 1` iff token t is a target (predicted from t-1 of the same segment), which
is exactly the mask of `Tokenizer.encode_chat_with_mask`. Padding has segment id 0 and loss_mask 0.
"""

from __future__ import annotations

from typing import Iterator, Optional, Sequence

import numpy as np

Example = tuple[Sequence[int], Sequence[bool]]  # (ids, mask) of one conversation
Batch = dict[str, np.ndarray]


def _fit(examples: Sequence[Example], seq_len: int, overlong: str) -> list[tuple[list[int], list[bool]]]:
    out = []
    for ids, mask in examples:
        if len(ids) != len(mask):
            raise ValueError(f"ids ({len(ids)}) and mask ({len(mask)}) lengths differ")
        if len(ids) > seq_len:
            if overlong == "skip":
                continue
            if overlong != "truncate":
                raise ValueError(f"conversation of {len(ids)} tokens exceeds seq_len={seq_len}")
            ids, mask = ids[:seq_len], mask[:seq_len]
        out.append((list(ids), [bool(m) for m in mask]))
    return out


def pack_rows(examples: Sequence[Example], seq_len: int, *, overlong: str = "truncate") -> list[list[int]]:
    """First-fit-decreasing assignment of examples to rows of `seq_len` tokens → example indices per row.

    `overlong`: "truncate" (keep the first `seq_len` tokens), "skip", or "error".
    """
    lengths = [min(len(ids), seq_len) for ids, _ in examples]
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(examples)), key=lambda i: -lengths[i]):
        if len(examples[i][0]) > seq_len and overlong == "skip":
            continue
        if len(examples[i][0]) > seq_len and overlong == "error":
            raise ValueError(f"conversation {i} of {len(examples[i][0])} tokens exceeds seq_len={seq_len}")
        r = next((r for r, f in enumerate(free) if f >= lengths[i]), None)
        if r is None:
            rows.append([])
            free.append(seq_len)
            r = len(rows) - 1
        rows[r].append(i)
        free[r] -= lengths[i]
    return rows


def make_packed_batch(examples: Sequence[Example], rows: Sequence[Sequence[int]], seq_len: int, *,
                      pad_id: int = 0) -> Batch:
    """Materialises `rows` (example indices per row) as a packed `[len(rows), seq_len]` batch.

    Segment ids count 1, 2, ... within a row; positions restart at 0 per segment; the first token of
    every segment is never a target.
    """
    b = len(rows)
    batch = {"tokens": np.full((b, seq_len), pad_id, np.int32), "segment_ids": np.zeros((b, seq_len), np.int32),
             "positions": np.zeros((b, seq_len), np.int32), "loss_mask": np.zeros((b, seq_len), np.int32)}
    for r, row in enumerate(rows):
        at = 0
        for seg, i in enumerate(row, 1):
            ids, mask = examples[i]
            n = min(len(ids), seq_len - at)
            if n <= 0:
                raise ValueError(f"row {r} overflows seq_len={seq_len}")
            batch["tokens"][r, at:at + n] = ids[:n]
            batch["segment_ids"][r, at:at + n] = seg
            batch["positions"][r, at:at + n] = np.arange(n)
            batch["loss_mask"][r, at:at + n] = np.asarray(mask[:n], bool)
            batch["loss_mask"][r, at] = 0
            at += n
    return batch


def packed_batches(examples: Sequence[Example], batch_size: int, seq_len: int, *, pad_id: int = 0,
                   overlong: str = "truncate", drop_remainder: bool = False) -> Iterator[Batch]:
    """Packs all `examples` into rows, then yields `[batch_size, seq_len]` batches (last one padded with
    empty rows unless `drop_remainder`)."""
    examples = _fit(examples, seq_len, overlong)
    rows = pack_rows(examples, seq_len)
    for start in range(0, len(rows), batch_size):
        chunk = list(rows[start:start + batch_size])
        if len(chunk) < batch_size:
            if drop_remainder:
                return
            chunk += [[]] * (batch_size - len(chunk))
        yield make_packed_batch(examples, chunk, seq_len, pad_id=pad_id)


def bucketed_batches(examples: Sequence[Example], batch_size: int, *, multiple: int = 64,
                     max_len: Optional[int] = None, pad_id: int = 0, shuffle_seed: Optional[int] = None,
                     drop_remainder: bool = False) -> Iterator[Batch]:
    """Length-bucketed padding batches (one conversation per row) as an alternative to packing.

    Examples are sorted by length (after an optional seeded shuffle, so equal lengths mix), grouped
    `batch_size` at a time and right-padded to `round_up(longest, multiple)` (capped by `max_len`,
    longer conversations truncated). Batch order is shuffled too when `shuffle_seed` is given.
    """
    examples = _fit(examples, max_len, "truncate") if max_len else _fit(examples, 1 << 62, "error")
    order = np.arange(len(examples))
    rng = np.random.default_rng(shuffle_seed) if shuffle_seed is not None else None
    if rng is not None:
        rng.shuffle(order)
    order = sorted(order, key=lambda i: len(examples[i][0]))
    groups = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    if drop_remainder and groups and len(groups[-1]) < batch_size:
        groups.pop()
    if rng is not None:
        rng.shuffle(groups)
    for g in groups:
        longest = max(len(examples[i][0]) for i in g)
        s = -(-longest // multiple) * multiple
        if max_len:
            s = min(s, max_len)
        rows = [[i] for i in g] + [[]] * (batch_size - len(g))
        yield make_packed_batch(examples, rows, s, pad_id=pad_id)
