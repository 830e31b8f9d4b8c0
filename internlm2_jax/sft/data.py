"""SFT input: tokenized conversations → pre-packed rows → a resumable grain iterator, plus eval prompts.

Rows are packed once up front (`pack_rows`, first-fit-decreasing) and become a `grain.MapDataset`
shuffled per epoch (`shuffle(seed).repeat(reseed_each_epoch=True)`) and batched, so the iterator's
state is a single index that `Checkpointer` saves and restores exactly. With `packing="bucket"` every
element is a whole length-bucketed padding batch instead (variable `S` per batch).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import numpy as np

from internlm2_jax.errors import EmptyDatasetError
from internlm2_jax.sft.formats import Message
from internlm2_jax.sft.packing import Example, _fit, bucketed_batches, make_packed_batch, pack_rows
from internlm2_jax.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class SFTDataConfig:
    """How conversations become batches."""

    seq_len: int = 4096
    """Tokens per packed row (or the maximum padded length with `packing="bucket"`)."""
    global_batch_size: int = 16
    """Rows per step over all processes."""
    packing: str = "pack"
    """`"pack"` (several conversations per row, segment ids) or `"bucket"` (length buckets, padding)."""
    bucket_multiple: int = 64
    """With `"bucket"`: padded lengths are multiples of this."""
    overlong: str = "truncate"
    """Conversations longer than `seq_len`: `"truncate"`, `"skip"` or `"error"`."""
    last_turn_only: bool = False
    """Loss only on the final assistant turn."""


def fitted_examples(examples: Sequence[Example], cfg: SFTDataConfig) -> list[tuple[list[int], list[bool]]]:
    """The examples as they are trained (overlong ones truncated, or skipped with `overlong="skip"`);
    `EmptyDatasetError` when none is left: steps over padding rows would train nothing."""
    fitted = _fit(examples, cfg.seq_len, cfg.overlong if cfg.packing == "pack" else "truncate")
    if not examples:
        raise EmptyDatasetError("no conversation to train on")
    if not fitted:
        raise EmptyDatasetError(f"no conversation to train on: all {len(examples)} are longer than "
                                f"SFTDataConfig.seq_len={cfg.seq_len} and SFTDataConfig.overlong='skip'")
    return fitted


def num_rows(examples: Sequence[Example], cfg: SFTDataConfig) -> int:
    """Rows (packing) or examples (bucketing) in one epoch; used to size "one epoch" in steps."""
    fitted = fitted_examples(examples, cfg)
    if cfg.packing == "bucket":
        return len(fitted)
    return len(pack_rows(fitted, cfg.seq_len))


def make_train_iterator(examples: Sequence[Example], cfg: SFTDataConfig, *, seed: int, pad_id: int) -> Any:
    """Endless resumable grain iterator of host-local batches `{tokens, segment_ids, positions, loss_mask}`
    int32 `[B / process_count, S]`; each process takes every `process_count`-th row."""
    import grain

    nproc, pid = jax.process_count(), jax.process_index()
    if cfg.global_batch_size % nproc:
        raise ValueError(f"global_batch_size={cfg.global_batch_size} is not divisible by {nproc} processes")
    local = cfg.global_batch_size // nproc
    fitted = fitted_examples(examples, cfg)
    if cfg.packing == "pack":
        rows = pack_rows(fitted, cfg.seq_len)
        if len(rows) < cfg.global_batch_size:
            rows += [[]] * (cfg.global_batch_size - len(rows))  # tiny datasets: pad with empty rows
        batch = make_packed_batch(fitted, rows, cfg.seq_len, pad_id=pad_id)
        records = [{k: v[r] for k, v in batch.items()} for r in range(pid, len(rows), nproc)]
        ds = grain.MapDataset.source(records).shuffle(seed=seed).repeat(None).batch(local, drop_remainder=True)
    elif cfg.packing == "bucket":
        batches = list(bucketed_batches(examples, cfg.global_batch_size, multiple=cfg.bucket_multiple,
                                        max_len=cfg.seq_len, pad_id=pad_id, shuffle_seed=seed))
        records = [{k: v[pid::nproc] for k, v in b.items()} for b in batches]
        ds = grain.MapDataset.source(records).shuffle(seed=seed).repeat(None)
    else:
        raise ValueError(f"packing must be 'pack' or 'bucket', got {cfg.packing!r}")
    return iter(ds.to_iter_dataset())


def eval_prompts(tokenizer: Tokenizer, conversations: Sequence[Sequence[Message]]) -> tuple[list[list[int]], list[str]]:
    """Prompts (everything before the last assistant turn + the generation header) and reference answers."""
    prompts, answers = [], []
    for msgs in conversations:
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        prompts.append(tokenizer.encode_chat(msgs[:last], add_generation_prompt=True))
        answers.append(msgs[last]["content"])
    return prompts, answers


def eval_batch(examples: Sequence[Example], seq_len: int, batch_size: int, pad_id: int) -> dict[str, np.ndarray]:
    """One packed `[batch_size, seq_len]` batch of (up to) the first examples that fit, for eval loss."""
    fitted = _fit(examples, seq_len, "truncate")
    rows = pack_rows(fitted, seq_len)[:batch_size]
    rows += [[]] * (batch_size - len(rows))
    return make_packed_batch(fitted, rows, seq_len, pad_id=pad_id)
