"""The InternLM2 report's pretraining data pipeline (issue 6).

Modules (imported lazily; import the one you need):
  records            record format, language/type heuristics
  normalize          JSONL / text folder / code repository / TFDS readers (bad input counted)
  decoding           bytes -> text per document (UTF-8 first, bad bytes replaced and counted; GB18030 fallback)
  filters            Gopher-style rule filters (CJK-aware)
  dedup              MinHash-LSH: near_duplicate_clusters(texts, *, threshold=0.7, num_perm=128, ngram=5, seed=0)
  safety             domain/word blocklists, TextClassifier protocol, HashedNgramLogReg
  quality            NgramLM, PerplexityScorer, QualityFilter, model_logprob_fn (InternLM2 adapter)
  longtext           >= 32 KB texts: statistics + P(S2|S1) vs P(S2) coherence filter
  code, code_deps    markdown format, indent-insensitive dedup, tiers, dependency sorting
  layout             which shard a record goes to (stable hash of its id), shared by both runners
  writers            ArrayRecord/JSONL shards (Grain-readable); write_shard writes one shard
  output             staged write + manifest.json written last; verify(workdir) tells complete output
  pipeline           single-process chain + stats; beam_pipeline: the same as Beam transforms
                     (beam_write: shards written in parallel, one commit from their metadata)
  tokenizer_training InternLM2-style sentencepiece BPE training
"""
