"""The pipeline as Apache Beam transforms (DirectRunner locally; Dataflow/Flink/Spark at scale).

Same stages and decisions as :mod:`.pipeline` (the output is identical, see the tests):

* read: one element per input file / repository / TFDS spec; bad input is counted per element and
  the counters are merged;
* rules and all post-dedup stages: per-record ``DoFn``s (the :class:`~.pipeline.Stages` are built
  once per worker in ``setup``);
* MinHash dedup (:func:`keep_most_recent`): per-record signature -> band keys ->
  ``GroupByKey((band, key))`` -> edges from the smallest id of each bucket to the others (verified on the
  signature estimate like the local run) -> connected components as a distributed computation
  (:mod:`.beam_components`: large-star / small-star rounds, each a shuffle keyed by node, then a check that
  fails the run if they did not converge; label = smallest id of the component, as union-find gives
  locally) -> join the labels to (id, timestamp) -> keyed combine of `pipeline.choose_keep` per cluster
  -> join the kept ids to the records by id. Code files take the same combine, grouped by their
  indent-insensitive key. No step holds the id list or the edge list on one worker;
* code documents: ``GroupByKey(repository)`` -> dependency sort + packing;
* write (:mod:`.beam_write`): records keyed by (output, shard) of the shared layout (:mod:`.layout`) ->
  ``GroupByKey`` -> each shard written into the run's staging folder by whichever worker holds it, with the
  local runner's `writers.write_shard` (same bytes) -> one commit step (`pipeline.commit_outputs`: the same
  staged write + manifest commit as the local run, :mod:`.output`) that sees only the shards' metadata and
  the stats, which are combines (counts per drop reason, cluster size and bad-input kind; output totals).
  No step gathers records on one worker. The staging folder is made by the launcher before the pipeline
  runs (:func:`run_beam`), and removed if the run fails.

Records must have unique ids (the join key).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import pathlib
import shutil
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import apache_beam as beam
import numpy as np
from apache_beam.options.pipeline_options import PipelineOptions

from . import beam_write, code, dedup, output, pipeline
from .beam_components import DEFAULT_MAX_ROUNDS, ConnectedComponents
from .records import Record
from .stats import BadInput

_BAD = "bad_input"
log = logging.getLogger(__name__)


def _expand_spec(spec: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """One spec per JSONL file, so files are read in parallel (``run_beam`` already refused patterns that
    match nothing, with `pipeline.check_sources`)."""
    spec = dict(spec)
    if spec["kind"] != "jsonl":
        yield spec
        return
    for path in pipeline.jsonl_paths(spec):
        yield {**spec, "paths": [path]}


class _Read(beam.DoFn):
    def process(self, spec: dict[str, Any]) -> Iterator[Any]:
        bad = BadInput()
        for rec in pipeline.read_sources([spec], bad):
            yield rec
        yield beam.pvalue.TaggedOutput(_BAD, bad.to_dict(full=True))


class _StagesDoFn(beam.DoFn):
    """A DoFn that builds the single-process `pipeline.Stages` once per worker."""

    def __init__(self, cfg: pipeline.PipelineConfig):
        self.cfg = cfg

    def setup(self) -> None:
        self.stages = pipeline.Stages(self.cfg)


class _Rules(_StagesDoFn):
    def process(self, rec: Record) -> Iterator[Any]:
        rec = copy.deepcopy(rec)
        reason = self.stages.rules(rec)
        if reason:
            yield beam.pvalue.TaggedOutput("dropped", pipeline._drop(rec, "rules", reason))
        else:
            yield rec


class _BandKeys(beam.DoFn):
    def __init__(self, cfg: pipeline.PipelineConfig):
        self.cfg = cfg

    def setup(self) -> None:
        c = self.cfg
        self.dd = dedup.StreamingDeduper(threshold=c.dedup_threshold, num_perm=c.num_perm, ngram=c.ngram,
                                         seed=c.seed, verify_margin=c.dedup_verify_margin)

    def process(self, batch: list[Record]) -> Iterator[tuple[tuple[int, int], tuple[str, bytes]]]:
        """Band keys of a batch of records (~8x the docs/s of one per call, bench_dedup); a text's keys do
        not depend on the rest of its batch."""
        x, counts = dedup.batch_shingle_hashes([r["text"] for r in batch], self.dd.ngram)
        sig = self.dd.hasher.signatures_flat(x, counts)
        keys = dedup.band_keys(sig, self.dd.bands, self.dd.rows)
        for rec, n, rec_keys, rec_sig in zip(batch, counts.tolist(), keys.tolist(), sig):
            if n == 0:  # no tokens: never clusters
                continue
            sig_bytes = rec_sig.tobytes() if self.dd.min_estimate is not None else b""
            for band, key in enumerate(rec_keys):
                yield (band, key), (rec["id"], sig_bytes)


def _bucket_edges(kv: tuple[Any, Sequence[tuple[str, bytes]]], min_estimate: float | None) -> Iterator[tuple[str, str]]:
    """Edges from the bucket's smallest id to the others (signature-verified when configured)."""
    members = sorted(dict(kv[1]).items())
    rep, rep_sig = members[0]
    for other, sig in members[1:]:
        if min_estimate is not None:
            a, b = np.frombuffer(rep_sig, np.uint32), np.frombuffer(sig, np.uint32)
            if (a == b).mean() < min_estimate:
                continue
        yield rep, other


def _keep_candidate(rec: Record) -> dict[str, Any]:
    """What `pipeline.choose_keep` looks at: combining these, not whole records, keeps the shuffle small."""
    return {"id": rec["id"], "timestamp": rec.get("timestamp")}


def _keep_or_drop(kv: tuple[str, Mapping[str, Sequence[Any]]]) -> Iterator[Any]:
    """A record whose id won its group's combine is kept; the others are dropped as duplicates."""
    rec = kv[1]["rec"][0]
    if kv[1]["keep"]:
        yield rec
    else:
        reason = "near_duplicate" if rec["type"] != "code" else "code_duplicate"
        yield beam.pvalue.TaggedOutput("dropped", pipeline._drop(copy.deepcopy(rec), "dedup", reason))


def lsh_edges(texts: beam.PCollection, cfg: pipeline.PipelineConfig) -> beam.PCollection:
    """Text records -> verified LSH candidate edges ``(smallest id of a bucket, other id)``."""
    return (texts | "Batches" >> beam.BatchElements(max_batch_size=1024) | "BandKeys" >> beam.ParDo(_BandKeys(cfg))
            | "Buckets" >> beam.GroupByKey()
            | "Edges" >> beam.FlatMap(_bucket_edges, None if cfg.dedup_verify_margin is None
                                      else cfg.dedup_threshold - cfg.dedup_verify_margin))


class DedupOutputs(NamedTuple):
    kept: beam.PCollection  # records
    dropped: beam.PCollection  # dropped records, marked by `pipeline._drop`
    sizes: beam.PCollection  # one int per group (cluster or code key)


def keep_most_recent(texts: beam.PCollection, codes: beam.PCollection, cfg: pipeline.PipelineConfig) -> DedupOutputs:
    """Near-duplicate texts (MinHash clusters) and equal code files -> one kept record per group.

    Text clusters are the distributed connected components of the verified LSH edges
    (:class:`~.beam_components.ConnectedComponents` with ``cfg.dedup_max_rounds`` round pairs, labelled by
    their smallest id like `dedup.components`); code files group by their indent-insensitive key. The kept id
    of each group is a keyed combine of `pipeline.choose_keep` over (id, timestamp) only; records then meet
    their verdict in a join by id.
    """
    edges = lsh_edges(texts, cfg)
    ids = texts | "Ids" >> beam.Map(lambda r: r["id"])
    max_rounds = DEFAULT_MAX_ROUNDS if cfg.dedup_max_rounds is None else cfg.dedup_max_rounds
    labels = (ids, edges) | "Components" >> ConnectedComponents(max_rounds)
    text_groups = ({"cand": texts | "TextCandidates" >> beam.Map(lambda r: (r["id"], _keep_candidate(r))),
                    "cluster": labels}
                   | "JoinLabels" >> beam.CoGroupByKey()
                   | "ByCluster" >> beam.Map(lambda kv: (("t", kv[1]["cluster"][0]), kv[1]["cand"][0])))
    code_groups = codes | "ByCodeKey" >> beam.Map(lambda r: (("c", code.dedup_key(r["text"])), _keep_candidate(r)))
    groups = (text_groups, code_groups) | "AllGroups" >> beam.Flatten()
    sizes = groups | "GroupSizes" >> beam.combiners.Count.PerKey() | "Sizes" >> beam.Values()
    keep_ids = (groups | "ChooseKeep" >> beam.CombinePerKey(pipeline.choose_keep)
                | "KeepIds" >> beam.Map(lambda kv: (kv[1]["id"], True)))
    records = (texts, codes) | "AllRecords" >> beam.Flatten() | "ById" >> beam.Map(lambda r: (r["id"], r))
    decided = ({"rec": records, "keep": keep_ids} | "JoinKeep" >> beam.CoGroupByKey()
               | "Decide" >> beam.FlatMap(_keep_or_drop).with_outputs("dropped", main="kept"))
    return DedupOutputs(decided.kept, decided.dropped, sizes)


class _PostDedup(_StagesDoFn):
    def process(self, rec: Record) -> Iterator[Any]:
        rec = copy.deepcopy(rec)
        res = self.stages.post_dedup(rec)
        if res:
            yield beam.pvalue.TaggedOutput("dropped", pipeline._drop(rec, *res))
        elif rec["type"] == "code":
            yield beam.pvalue.TaggedOutput("code", rec)
        else:
            yield rec


class _MergeBad(beam.CombineFn):
    """Per-file bad-input reports -> one report (`BadInput.to_dict` of the whole run)."""

    def create_accumulator(self) -> BadInput:
        return BadInput()

    def add_input(self, acc: BadInput, part: dict[str, Any]) -> BadInput:
        acc.merge(part)
        # The report keeps the first max_examples in sorted order: keeping only those bounds the accumulator
        # and gives the same report as merging every example.
        acc.examples = {k: sorted(v)[:acc.max_examples] for k, v in acc.examples.items()}
        return acc

    def merge_accumulators(self, accs: Iterable[BadInput]) -> BadInput:
        out = BadInput()
        for acc in accs:
            self.add_input(out, acc.to_dict(full=True))
        return out

    def extract_output(self, acc: BadInput) -> dict[str, Any]:
        return acc.to_dict()


def _histogram(values: beam.PCollection, label: str) -> beam.PCollection:
    """``value -> how many`` as one dict (a global combine: one entry per distinct value)."""
    return values | f"Count {label}" >> beam.combiners.Count.PerElement() | f"{label} dict" >> beam.combiners.ToDict()


def _commit(_: Any, workdir: str, staging: str, shards: list, n_input: int, bad: dict[str, Any],
            drop_reasons: dict[str, int], sizes: dict[int, int], totals: dict[str, pipeline.Totals]) -> Iterator[str]:
    """The final step: stats from combines, then the shared commit from the shards' metadata."""
    pipeline.check_not_empty(n_input, bad)
    stats = pipeline.summarize(n_input, drop_reasons, {name: totals[name] for name in ("text", "code")}, bad,
                               {str(k): v for k, v in sorted(sizes.items())})
    pipeline.commit_outputs(workdir, pathlib.Path(staging), shards, stats)
    yield workdir


def build(p: beam.Pipeline, specs: Sequence[Mapping[str, Any]], workdir: str, staging: str,
          cfg: pipeline.PipelineConfig) -> None:
    """Add the whole chain to pipeline ``p``: shards written into ``staging`` (a folder from
    `output.new_staging(workdir)`), then committed into ``workdir`` with ``stats.json`` and ``manifest.json``."""
    read = (p | "Specs" >> beam.Create([dict(s) for s in specs]) | "Expand" >> beam.FlatMap(_expand_spec)
            | "Read" >> beam.ParDo(_Read()).with_outputs(_BAD, main="records"))
    records = read.records
    n_input = records | "CountInput" >> beam.combiners.Count.Globally()
    ruled = records | "Rules" >> beam.ParDo(_Rules(cfg)).with_outputs("dropped", main="kept")
    kept = ruled.kept
    texts = kept | "Texts" >> beam.Filter(lambda r: r["type"] != "code")
    codes = kept | "Codes" >> beam.Filter(lambda r: r["type"] == "code")

    chosen = keep_most_recent(texts, codes, cfg)
    post = chosen.kept | "PostDedup" >> beam.ParDo(_PostDedup(cfg)).with_outputs("dropped", "code", main="text")
    code_docs = (post.code
                 | "ByRepo" >> beam.Map(lambda r: (f"{r['source']}/{r['meta'].get('repo', '')}", r))
                 | "Repos" >> beam.GroupByKey()
                 | "Pack" >> beam.FlatMap(lambda kv: pipeline.code_documents(list(kv[1]), cfg.code_context_chars)))
    dropped = (ruled.dropped, chosen.dropped, post.dropped) | "AllDropped" >> beam.Flatten()
    outputs = {"text": post.text, "code": code_docs}
    shards = beam_write.write_shards({**outputs, "rejected": dropped}, staging, cfg.records_per_shard)
    totals = ([recs | f"Totals {name}" >> beam.Map(pipeline.record_totals)
               | f"Sum {name}" >> beam.CombineGlobally(pipeline.sum_totals)
               | f"Name {name}" >> beam.Map(lambda t, name=name: (name, t)) for name, recs in outputs.items()]
              | "AllTotals" >> beam.Flatten())
    bad = read[_BAD] | "MergeBad" >> beam.CombineGlobally(_MergeBad())
    drop_reasons = _histogram(dropped | "Reasons" >> beam.Map(lambda r: r["meta"]["dropped_by"]), "DropReasons")
    sizes = _histogram(chosen.sizes, "ClusterSizes")
    _ = (p | "Final" >> beam.Create([None])
         | "Commit" >> beam.FlatMap(
             _commit, str(workdir), str(staging), beam.pvalue.AsList(shards), beam.pvalue.AsSingleton(n_input),
             beam.pvalue.AsSingleton(bad), beam.pvalue.AsSingleton(drop_reasons), beam.pvalue.AsSingleton(sizes),
             beam.pvalue.AsDict(totals)))


def run_beam(specs: Sequence[Mapping[str, Any]], workdir: str | pathlib.Path, cfg: pipeline.PipelineConfig,
             *, runner: str = "DirectRunner", options: Sequence[str] = (),
             max_rounds: int | None = None) -> dict[str, Any]:
    """Run on ``runner`` (e.g. DirectRunner, DataflowRunner, FlinkRunner, SparkRunner) and return
    the stats report (read back from ``{workdir}/manifest.json``, which must be on a shared path; the
    output is staged and committed exactly as in the local run). ``max_rounds`` overrides
    ``cfg.dedup_max_rounds``."""
    pipeline.check_sources(specs)  # here, not in a worker: one clear line naming the pattern
    if max_rounds is not None:
        cfg = dataclasses.replace(cfg, dedup_max_rounds=max_rounds)
    staging = output.new_staging(workdir)  # on the launcher: one folder for all workers, made before any runs
    opts = PipelineOptions([f"--runner={runner}", *options])
    log.info("running on Beam %s", runner)
    try:
        with beam.Pipeline(options=opts) as p:
            build(p, specs, str(workdir), str(staging), cfg)
    except BaseException:  # nothing committed (or a commit cut short: no manifest); drop the partial shards
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output.verify(workdir, checksums=False)["stats"]
