"""Pretraining input pipeline: sources -> shuffle -> mix -> shard -> tokenize -> pack -> batch.

    per source:  MapDataset.source(docs).shuffle(seed_k).repeat(num_epochs)   (random access)
    mix:         MapDataset.mix(weights)            (train)  |  concatenate (validation)
    shard:       [shard_index::shard_count]         (documents, before tokenization)
    tokenize:    .map(text -> [bos] + ids + [eos])  run by `read_threads` threads
    pack:        chunk to <= S, first-fit pack into rows [S]  (+ optional row window shuffle)
    batch:       [local_batch, S] dicts of int32 numpy arrays
    prefetch:    `prefetch_batches` batches ahead in a background thread

Everything up to tokenization is index-based, so the iterator state is a few integers:
`it.get_state()` is a JSON-serializable dict and `it.set_state(state)` resumes exactly.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any, Literal, Protocol

import grain
import numpy as np

from internlm2_jax.errors import EmptyDatasetError
from internlm2_jax.input import mixture, packing, sources

Batch = dict[str, np.ndarray]


class TokenizerLike(Protocol):
    bos_id: int
    eos_id: int

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]: ...


@dataclasses.dataclass(frozen=True)
class InputConfig:
    """Pretraining input configuration (plain kwargs, gin-configurable).

    Attributes:
      sources: name -> source URI, e.g. {"web": "jsonl:/data/web/{split}-*.jsonl",
        "code": "stdlib:/tmp/cache"}. Kinds: jsonl, text, arrayrecord, tfds (see `sources`), and
        `stdlib:<cache_dir>` (the embedded Python-stdlib corpus, built on first use).
        `{split}` is replaced by "train" / "validation".
      mixture: name -> weight (document-level, normalized; None = uniform), e.g. a stage
        mixture of the report. Ignored for validation (all sources read once, concatenated).
      seq_len: S, tokens per row.
      global_batch_size: rows per step over all processes; each process yields
        global_batch_size // process_count rows.
      seed: seeds the per-source document shuffles (epochs reshuffle with seed + epoch).
      shuffle: shuffle documents (training split only; validation is never shuffled).
      num_epochs: passes over each training source; None = repeat forever. The mixture ends
        when the first source exhausts its epochs. Validation is always one pass.
      add_bos / add_eos: documents become [bos] + ids + [eos].
      packing: first-fit pack several documents per row; False = one chunk per padded row.
      num_packing_bins: rows filled at once by first-fit (None: max(local batch, 16)).
      text_field: JSON / record field holding the text.
      text_mode: plain-text sources: one document per "file" or per blank-line "paragraph".
      on_error: bad records "raise" (error names file + line) or "skip" (counted + logged).
      read_threads: threads reading + tokenizing documents (0 = in the consumer thread).
      prefetch_buffer_size: documents buffered ahead by the reader threads.
      prefetch_batches: batches prepared ahead by a background thread, overlapping packing with
        the train step (0 = synchronous). Resume stays exact (state is per delivered batch).
      row_shuffle_window: training only: shuffle packed rows within windows of this many rows
        (seeded), so the chunks of one long document do not all land in the same batch.
        0 = off. A restore re-packs at most one window.
      pad_id: token id written into padding slots (loss_mask is 0 there anyway).
    """

    sources: Mapping[str, str] = dataclasses.field(default_factory=dict)
    mixture: Mapping[str, float] | None = None
    seq_len: int = 2048
    global_batch_size: int = 8
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = None
    add_bos: bool = True
    add_eos: bool = True
    packing: bool = True
    num_packing_bins: int | None = None
    text_field: str = "text"
    text_mode: Literal["file", "paragraph"] = "file"
    on_error: Literal["raise", "skip"] = "raise"
    read_threads: int = 2
    prefetch_buffer_size: int = 64
    prefetch_batches: int = 2
    row_shuffle_window: int = 0
    pad_id: int = 0


def open_config_source(uri: str, split: str, cfg: InputConfig) -> sources._TextSourceBase:
    """`sources.open_source`, plus the `stdlib:<cache_dir>` kind."""
    if uri.startswith("stdlib:"):
        from internlm2_jax.input import stdlib_corpus

        corpus_dir = stdlib_corpus.build_stdlib_corpus(uri[len("stdlib:"):] or None)
        uri = f"jsonl:{corpus_dir}/{{split}}-*.jsonl"
    return sources.open_source(uri, split, text_field=cfg.text_field, text_mode=cfg.text_mode,
                               on_error=cfg.on_error)


def document_stream(cfg: InputConfig, split: str = "train", *, shard_index: int = 0,
                    shard_count: int = 1, opened: list | None = None) -> grain.MapDataset:
    """Text documents (str) of this shard, shuffled + mixed for "train", in order otherwise.

    The opened sources are appended to `opened` (when given), for their skip counts. A source without a
    document is an `EmptyDatasetError` naming it: training would otherwise wait forever for a batch.
    """
    train = split == "train"
    per_source = {}
    for name, uri in sorted(cfg.sources.items()):
        src = open_config_source(uri, split, cfg)
        if opened is not None:
            opened.append(src)
        ds = grain.MapDataset.source(src)
        if len(ds) == 0:
            raise EmptyDatasetError(f"{src.describe()}: input source {name!r} ({uri}) has no documents for "
                                    f"split {split!r}")
        if train:
            if cfg.shuffle:
                ds = ds.shuffle(seed=mixture.source_seed(cfg.seed, name))
            ds = ds.repeat(cfg.num_epochs)  # reshuffles every epoch (seed + epoch)
        per_source[name] = ds
    ds = mixture.mix_sources(per_source, cfg.mixture) if train else mixture.concat_sources(per_source)
    return mixture.shard(ds, shard_index, shard_count)


def local_batch_size(cfg: InputConfig, shard_count: int) -> int:
    if cfg.global_batch_size % shard_count:
        raise ValueError(f"global_batch_size {cfg.global_batch_size} is not divisible by the "
                         f"{shard_count} processes")
    return cfg.global_batch_size // shard_count


def make_pretrain_dataset(cfg: InputConfig, *, tokenizer: TokenizerLike, split: str = "train",
                          shard_index: int | None = None, shard_count: int | None = None,
                          opened: list | None = None) -> grain.IterDataset:
    """The pipeline as a Grain IterDataset of batches {tokens, segment_ids, positions,
    loss_mask}: int32 [global_batch_size // shard_count, seq_len]. `opened`: see `document_stream`."""
    shard_index, shard_count = mixture.resolve_shard(shard_index, shard_count)
    batch = local_batch_size(cfg, shard_count)
    bos = tokenizer.bos_id if cfg.add_bos else None
    eos = tokenizer.eos_id if cfg.add_eos else None

    def tokenize(text: str) -> dict[str, np.ndarray] | None:
        toks = packing.document_tokens(tokenizer.encode(text), bos_id=bos, eos_id=eos)
        return {"tokens": toks} if len(toks) else None

    docs = document_stream(cfg, split, shard_index=shard_index, shard_count=shard_count, opened=opened)
    read = grain.ReadOptions(num_threads=cfg.read_threads,
                             prefetch_buffer_size=cfg.prefetch_buffer_size if cfg.read_threads else 0)
    ds = docs.map(tokenize).to_iter_dataset(read)
    rows = packing.pack_documents(ds, cfg.seq_len, num_bins=cfg.num_packing_bins or max(batch, 16),
                                  pad_id=cfg.pad_id, packing=cfg.packing)
    if split == "train" and cfg.shuffle and cfg.row_shuffle_window > 1:
        rows = grain.experimental.WindowShuffleIterDataset(
            rows, window_size=cfg.row_shuffle_window, seed=cfg.seed)
    out = rows.batch(batch, batch_fn=lambda r: packing.stack_rows(r, batch))
    if cfg.prefetch_batches > 0:
        out = grain.experimental.ThreadPrefetchIterDataset(
            out, prefetch_buffer_size=cfg.prefetch_batches)
    return out


def make_pretrain_iterator(cfg: InputConfig, *, tokenizer: TokenizerLike, split: str = "train",
                           shard_index: int | None = None, shard_count: int | None = None,
                           ) -> grain.DatasetIterator:
    """Iterator of this process's batches (see `make_pretrain_dataset`).

    `split="train"`: shuffled (if cfg.shuffle), mixed by cfg.mixture, cfg.num_epochs passes.
    Any other split: unshuffled, all sources once, finite; the last batch is padded with empty
    rows (loss_mask 0). Shards default to (jax.process_index(), jax.process_count()).
    The iterator supports `get_state()` (JSON-serializable dict) / `set_state(state)`;
    `skipped_records(it)` counts the bad records it has left out (`on_error="skip"`).
    """
    opened: list[sources._TextSourceBase] = []
    it = iter(make_pretrain_dataset(cfg, tokenizer=tokenizer, split=split, shard_index=shard_index,
                                    shard_count=shard_count, opened=opened))
    it._input_sources = opened  # read by `skipped_records`
    return it


def skipped_records(it: grain.DatasetIterator) -> int:
    """Distinct bad records left out so far by this process's iterator from `make_pretrain_iterator`
    (`InputConfig.on_error="skip"`; 0 otherwise), for a stage's final summary (`"skipped_records"`)."""
    return sum(src.num_bad_records for src in getattr(it, "_input_sources", ()))


# ---- iterator state persistence ------------------------------------------------------------
def save_iterator_state(it: grain.DatasetIterator, path: str | os.PathLike) -> None:
    """Write `it.get_state()` as JSON (atomically) - for use outside Orbax."""
    tmp = f"{os.fspath(path)}.tmp"
    with open(tmp, "w") as f:
        json.dump(it.get_state(), f)
    os.replace(tmp, path)


def restore_iterator_state(it: grain.DatasetIterator, path: str | os.PathLike) -> None:
    """Inverse of `save_iterator_state`: the next batch is the one after the saved point."""
    with open(path) as f:
        it.set_state(json.load(f))


def orbax_save_args(it: grain.DatasetIterator) -> Any:
    """Orbax arg saving the iterator (one JSON file per process) inside a Composite checkpoint:
    `mngr.save(step, args=ocp.args.Composite(state=..., data=orbax_save_args(it)))`."""
    return grain.checkpoint.CheckpointSave(it)


def orbax_restore_args(it: grain.DatasetIterator) -> Any:
    """`mngr.restore(step, args=ocp.args.Composite(state=..., data=orbax_restore_args(it)))`
    restores `it` in place (the Composite result's `data` is the same iterator)."""
    return grain.checkpoint.CheckpointRestore(it)

