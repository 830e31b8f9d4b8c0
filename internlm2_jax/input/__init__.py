"""Pretraining input pipeline (Grain): sources, packing, mixing, sharding, resumable iterators.

Main entry points:
  InputConfig, make_pretrain_iterator, make_pretrain_dataset  (pipeline)
  build_stdlib_corpus, ensure_tokenizer                       (embedded offline corpus)
  open_source, JsonlSource, PlainTextSource, ArrayRecordSource, TfdsSource  (sources)
`tfds_builder` (local TFDS dataset) is imported lazily since it pulls in tensorflow_datasets.
"""

from internlm2_jax.input.packing import document_tokens, pack_documents, split_document
from internlm2_jax.input.pipeline import (
    InputConfig,
    make_pretrain_dataset,
    make_pretrain_iterator,
    orbax_restore_args,
    orbax_save_args,
    restore_iterator_state,
    save_iterator_state,
)
from internlm2_jax.input.sources import (
    ArrayRecordSource,
    BadRecordError,
    JsonlSource,
    PlainTextSource,
    TfdsSource,
    open_source,
)
from internlm2_jax.input.stdlib_corpus import build_stdlib_corpus, ensure_tokenizer

__all__ = [
    "ArrayRecordSource", "BadRecordError", "InputConfig", "JsonlSource", "PlainTextSource",
    "TfdsSource", "build_stdlib_corpus", "document_tokens", "ensure_tokenizer",
    "make_pretrain_dataset", "make_pretrain_iterator", "open_source", "orbax_restore_args",
    "orbax_save_args", "pack_documents", "restore_iterator_state", "save_iterator_state",
    "split_document",
]
