"""Tokenized documents -> fixed-length rows with segment ids and positions.

Row format (all int32, shape [S] with S = seq_len):
  tokens       token ids; padding slots hold `pad_id`
  segment_ids  1, 2, 3, ... per document within the row; 0 = padding
  positions    restart at 0 at the first token of every segment; 0 on padding
  loss_mask    1 on real tokens, 0 on padding. The loss treats `loss_mask[t] = 1` as "token t is a
               target when predicted from t-1 in the same segment", so the first token of a
               segment is never a target whatever its mask says.

Documents longer than S are split into chunks of at most S tokens *before* packing; every chunk
is its own segment (positions restart at 0, no BOS is re-inserted). Packing uses Grain's online
first-fit (`grain.experimental.FirstFitPackIterDataset`): a batch of `num_bins` rows is filled
first-fit; when a chunk fits no row the rows are emitted (in row order) and a new batch starts.
So a chunk never crosses a row boundary.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

Example = dict[str, np.ndarray]


def document_tokens(ids: Sequence[int], *, bos_id: int | None, eos_id: int | None) -> np.ndarray:
    """`[bos] + ids + [eos]` as int32 [n]; pass `None` to leave out bos / eos."""
    head = [bos_id] if bos_id is not None else []
    tail = [eos_id] if eos_id is not None else []
    return np.asarray(head + list(ids) + tail, np.int32)


def split_document(tokens: np.ndarray, seq_len: int) -> list[np.ndarray]:
    """Chunks of at most `seq_len` tokens (the last one may be shorter); [] for an empty doc."""
    return [tokens[i:i + seq_len] for i in range(0, len(tokens), seq_len)]


class ChunkDocuments(grain.experimental.FlatMapTransform):
    """{"tokens": [n]} -> [{"tokens": [<=S]}, ...]: split long documents into segments."""

    def __init__(self, seq_len: int):
        self.seq_len = seq_len
        self.max_fan_out = 1 << 20  # only checked by the MapDataset flat map, which we do not use

    def flat_map(self, element: Example) -> list[Example]:
        return [{"tokens": c} for c in split_document(element["tokens"], self.seq_len)]


def _finalize_packed(element: dict[str, Any]) -> Example:
    """Grain packed row {"tokens", "tokens_segment_ids", "tokens_positions"} -> row format."""
    seg = element["tokens_segment_ids"].astype(np.int32)
    return {
        "tokens": element["tokens"].astype(np.int32),
        "segment_ids": seg,
        "positions": element["tokens_positions"].astype(np.int32),
        "loss_mask": (seg > 0).astype(np.int32),
    }


def pad_row(tokens: np.ndarray, seq_len: int, pad_id: int = 0) -> Example:
    """One chunk (len <= S) alone in a row: the unpacked row format, padded to S."""
    n = len(tokens)
    if n > seq_len:
        raise ValueError(f"chunk of {n} tokens does not fit seq_len={seq_len}")
    out = np.full(seq_len, pad_id, np.int32)
    out[:n] = tokens
    real = (np.arange(seq_len) < n).astype(np.int32)
    return {"tokens": out, "segment_ids": real.copy(),
            "positions": np.where(real, np.arange(seq_len), 0).astype(np.int32), "loss_mask": real}


def pack_documents(ds: grain.IterDataset, seq_len: int, *, num_bins: int, pad_id: int = 0,
                   packing: bool = True) -> grain.IterDataset:
    """IterDataset of {"tokens": int32 [n]} documents -> IterDataset of rows (format above).

    Args:
      ds: documents (any length >= 1; longer than `seq_len` ones are chunked).
      seq_len: S, the row length.
      num_bins: rows filled concurrently by first-fit (more bins = denser packing, more latency).
      pad_id: token id written in padding slots.
      packing: False puts every chunk alone in its own padded row.
    """
    ds = grain.experimental.FlatMapIterDataset(ds, ChunkDocuments(seq_len))
    if not packing:
        return ds.map(lambda e: pad_row(e["tokens"], seq_len, pad_id))
    ds = grain.experimental.FirstFitPackIterDataset(
        ds, length_struct={"tokens": seq_len}, num_packing_bins=num_bins, shuffle_bins=False,
        padding_struct={"tokens": pad_id})
    return ds.map(_finalize_packed)


def stack_rows(rows: Sequence[Example], batch_size: int) -> Example:
    """Stack rows into [batch_size, S] arrays; a short final batch is padded with empty rows
    (all zeros, loss_mask 0) so shapes stay static for jit."""
    out = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    missing = batch_size - len(rows)
    if missing > 0:
        out = {k: np.concatenate([v, np.zeros((missing,) + v.shape[1:], v.dtype)])
               for k, v in out.items()}
    return out
