"""The single-process data pipeline (the Beam version in :mod:`.beam_pipeline` gives equal output).

Stages, in order; a dropped record gets ``meta['dropped_by'] = '<stage>/<reason>'``:

1. ``rules``     -- :func:`.filters.apply_rules` (Gopher-style; code rules for code)
2. ``dedup``     -- text: MinHash-LSH clusters, keep the most recent (ties: smallest id);
                    code: indent-insensitive exact duplicates, same choice rule
3. ``safety``    -- domain blocklist, word lists, optional classifier
4. ``quality``   -- perplexity scorer with per-type thresholds (optional)
5. ``longtext``  -- statistics + coherence filter for texts >= 32 KB
6. ``code_tiers``-- code quality tiers (low dropped; high repeated)
Then code files are grouped per repository, dependency-sorted and packed into documents.

Input bytes are decoded per document (:mod:`.decoding`); output shards follow :mod:`.layout` (shard =
stable hash of the id modulo the shard count, sorted by id inside), are written by `writers.write_shard`,
staged and committed with a manifest written last (:mod:`.output`, :func:`commit_outputs`). All of these
are shared with the Beam runner, which writes the same bytes.
"""

from __future__ import annotations

import dataclasses
import errno
import glob
import logging
import pathlib
import shutil
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from internlm2_jax.errors import ConfigValueError, EmptyDatasetError, InputDataError

from . import code, code_deps, dedup, filters, layout, longtext, normalize, output, quality, safety
from .records import Record, make_record
from .stats import BadInput, approx_tokens
from .writers import Shard, write_shards

STAGES = ("rules", "dedup", "safety", "quality", "longtext", "code_tiers")
log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """Every knob of the pipeline (gin-bindable through ``experiments/prepare_data.py``)."""

    rules: filters.RuleConfig = filters.RuleConfig()
    dedup_threshold: float = 0.7
    num_perm: int = 128
    ngram: int = 5
    seed: int = 0
    dedup_verify_margin: float | None = 0.1
    blocked_domains: tuple[str, ...] = ()
    blocked_words: tuple[str, ...] = ()
    min_word_hits: int = 2
    safety_classifier: str | None = None  # path of a saved HashedNgramLogReg (.npz)
    safety_threshold: float = 0.5
    quality_reference: tuple[str, ...] = ()  # texts to fit the word n-gram LM; empty = stage off
    quality_thresholds: tuple[tuple[str, float], ...] = ()
    long_min_bytes: int = longtext.LONG_TEXT_BYTES
    long_margins: tuple[tuple[str, float], ...] = tuple(longtext.DEFAULT_MARGINS.items())
    long_num_splits: int = 16
    long_context_chars: int = 1000
    long_target_chars: int = 800
    code_high: float = 0.8
    code_low: float = 0.4
    code_high_repeats: int = 2
    code_context_chars: int = 32_768
    # Average records per output shard: an output of n records gets ceil(n / records_per_shard) shards
    # (:mod:`.layout`; records spread by a hash of their id, so shards vary a little around it).
    records_per_shard: int = 10_000
    # Beam runner only: large-star / small-star round pairs unrolled for the dedup clusters
    # (:mod:`.beam_components`; None: its DEFAULT_MAX_ROUNDS). Too few fails the run with "raise max_rounds";
    # each pair is two shuffles, so graphs with known-short chains run faster with fewer (docs/benchmarks.md).
    dedup_max_rounds: int | None = None

    def __post_init__(self) -> None:
        """Refuses values that would only fail deep inside a run (gin checks ``records_per_shard`` too)."""
        for name in ("records_per_shard", "dedup_max_rounds"):
            value = getattr(self, name)
            if value is None and name == "dedup_max_rounds":
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigValueError(f"bad value PipelineConfig.{name}={value!r}: expected an integer, "
                                       f"got {type(value).__name__}")
            if value < 1:
                raise ConfigValueError(f"bad value PipelineConfig.{name}={value!r}: must be >= 1")


class Stages:
    """The per-record stages built once from a config (shared by both runners)."""

    def __init__(self, cfg: PipelineConfig):
        self.cfg = cfg
        clf = safety.HashedNgramLogReg.load(cfg.safety_classifier) if cfg.safety_classifier else None
        self.safety = safety.SafetyFilter(cfg.blocked_domains, cfg.blocked_words,
                                          min_word_hits=cfg.min_word_hits, classifier=clf,
                                          classifier_threshold=cfg.safety_threshold)
        self.quality = None
        if cfg.quality_reference:
            lm = quality.NgramLM(order=3).fit(quality.word_encode(t) for t in cfg.quality_reference)
            self.quality = quality.QualityFilter(quality.PerplexityScorer(lm, quality.word_encode),
                                                 dict(cfg.quality_thresholds))
        self.longtext = longtext.LongTextFilter(
            quality.NgramLM(order=2, cache_weight=0.5, cache_order=2), quality.word_encode,
            margins=dict(cfg.long_margins), min_bytes=cfg.long_min_bytes,
            num_splits=cfg.long_num_splits, context_chars=cfg.long_context_chars,
            target_chars=cfg.long_target_chars)

    def rules(self, rec: Record) -> str | None:
        return filters.apply_rules(rec, self.cfg.rules)

    def post_dedup(self, rec: Record) -> tuple[str, str] | None:
        """(stage, reason) of the first post-dedup stage that drops ``rec``; mutates ``meta``."""
        if rec["type"] == "code":
            r = code.assign_tiers([rec], high=self.cfg.code_high, low=self.cfg.code_low,
                                  high_repeats=self.cfg.code_high_repeats)[0]
            return ("code_tiers", r) if r else None
        r = self.safety.reasons([rec])[0]
        if r:
            return ("safety", r)
        if self.quality is not None:
            r = self.quality.reasons([rec])[0]
            if r:
                return ("quality", r)
        r = self.longtext.reason(rec)
        return ("longtext", r) if r else None


def jsonl_paths(spec: Mapping[str, Any]) -> list[str]:
    """The files of a ``jsonl`` spec's ``paths`` patterns (sorted per pattern); a pattern matching nothing
    is an :class:`InputDataError` naming it (a typo must not give a smaller dataset with exit 0)."""
    pats = spec.get("paths")
    if not pats:
        raise InputDataError(f"jsonl source {spec.get('source')!r}: no 'paths' given")
    paths: list[str] = []
    for pat in [pats] if isinstance(pats, (str, pathlib.Path)) else pats:  # one pattern, not its characters
        matched = sorted(glob.glob(str(pat), recursive=True))
        if not matched:
            raise InputDataError(f"{pat}: no file matches this pattern (source "
                                 f"{spec.get('source') or 'jsonl'!r})")
        paths += matched
    return paths


def check_sources(specs: Sequence[Mapping[str, Any]]) -> None:
    """Fails before any work when a source names nothing: a pattern matching no file, a missing folder, or
    a folder without matching files; the error names the pattern or folder."""
    for spec in specs:
        kind = spec.get("kind")
        if kind == "jsonl":
            jsonl_paths(spec)
        elif kind in ("text_dir", "code_repo"):
            if not spec.get("root"):
                raise InputDataError(f"{kind} source {spec.get('source')!r}: no 'root' given")
            root = pathlib.Path(spec["root"])
            if not root.is_dir():
                raise InputDataError(f"{root}: no such directory ({kind} source {spec.get('source')!r})")
            for sub in spec.get("include", ()):
                if not (root / sub).exists():
                    raise InputDataError(f"{root / sub}: not found (include of {kind} source {spec.get('source')!r})")
            if kind == "text_dir":
                pattern = spec.get("pattern", "**/*.txt")
                if not any(p.is_file() for p in root.glob(pattern)):
                    raise InputDataError(f"{root}/{pattern}: no file matches this pattern "
                                         f"(text_dir source {spec.get('source')!r})")
        elif kind != "tfds":
            raise InputDataError(f"unknown source kind {kind!r}; expected jsonl, text_dir, code_repo or tfds")


def read_sources(specs: Sequence[Mapping[str, Any]], bad: BadInput) -> Iterator[Record]:
    """Records of every source spec: ``{'kind': 'jsonl'|'text_dir'|'code_repo'|'tfds', ...}``."""
    for spec in specs:
        spec = dict(spec)
        kind, source = spec.pop("kind"), spec.pop("source", None)
        if kind == "jsonl":
            paths = jsonl_paths({**spec, "source": source})
            spec.pop("paths")
            yield from normalize.read_jsonl(paths, source or "jsonl", bad, **spec)
        elif kind == "text_dir":
            yield from normalize.read_text_dir(spec.pop("root"), source or "text", bad, **spec)
        elif kind == "code_repo":
            yield from normalize.read_code_repo(spec.pop("root"), source or "code", bad, **spec)
        elif kind == "tfds":
            yield from normalize.read_tfds(spec.pop("name"), source or "tfds", bad, **spec)
        else:
            raise InputDataError(f"unknown source kind {kind!r}; expected jsonl, text_dir, code_repo or tfds")


def check_not_empty(n_input: int, bad: Mapping[str, Any]) -> None:
    """No input record at all is an error (empty shards with exit 0 would pass for a dataset)."""
    if n_input == 0:
        first = next((f"; e.g. {k}: {v[0]}" for k, v in bad.get("examples", {}).items() if v), "")
        raise EmptyDatasetError(f"no input records in {bad.get('files_read', 0)} file(s) read (bad input: "
                                f"{bad.get('counts', {})}{first})")


def _drop(rec: Record, stage: str, reason: str) -> Record:
    rec.setdefault("meta", {})["dropped_by"] = f"{stage}/{reason}"
    return rec


def choose_keep(members: Iterable[Record]) -> Record:
    """The most recent record (ISO timestamps; None oldest), ties broken by the smallest id."""
    return min(members, key=lambda r: (-_ts_rank(r.get("timestamp")), r["id"]))


def _ts_rank(ts: str | None) -> float:
    if not ts:
        return float("-inf")
    digits = "".join(c for c in str(ts) if c.isdigit())[:14].ljust(14, "0")
    return float(digits)


def dedup_records(records: list[Record], cfg: PipelineConfig) -> tuple[list[Record], list[Record], dict[str, int]]:
    """(kept, dropped, cluster-size histogram) over texts (MinHash) and code (exact key)."""
    texts = sorted((r for r in records if r["type"] != "code"), key=lambda r: r["id"])  # star centers = smallest id, as in Beam
    codes = [r for r in records if r["type"] == "code"]
    cid = dedup.near_duplicate_clusters([r["text"] for r in texts], threshold=cfg.dedup_threshold,
                                        num_perm=cfg.num_perm, ngram=cfg.ngram, seed=cfg.seed,
                                        verify_margin=cfg.dedup_verify_margin)
    groups: dict[Any, list[Record]] = {}
    for r, c in zip(texts, cid):
        groups.setdefault(("t", c), []).append(r)
    for r in codes:
        groups.setdefault(("c", code.dedup_key(r["text"])), []).append(r)
    kept, dropped = [], []
    for members in groups.values():
        keep = choose_keep(members)
        for r in members:
            if r is keep:
                kept.append(r)
            else:
                dropped.append(_drop(r, "dedup", "near_duplicate" if r["type"] != "code" else "code_duplicate"))
    hist = Counter(len(m) for m in groups.values())
    return kept, dropped, {str(k): v for k, v in sorted(hist.items())}


def code_documents(code_records: list[Record], max_chars: int) -> list[Record]:
    """One or more dependency-sorted markdown documents per repository."""
    by_repo: dict[str, list[Record]] = {}
    for r in code_records:
        by_repo.setdefault(f"{r['source']}/{r['meta'].get('repo', '')}", []).append(r)
    out = []
    for repo in sorted(by_repo):
        members = sorted(by_repo[repo], key=lambda r: r["id"])
        ts = max((r["timestamp"] or "" for r in members), default="") or None
        for k, text in enumerate(code_deps.repository_documents(members, max_chars)):
            out.append(make_record(f"{repo}#{k:05d}", text, members[0]["source"], lang="code", type="code",
                                   timestamp=ts, meta={"repo": members[0]["meta"].get("repo"),
                                                       "files": len(members)}))
    return out


Totals = tuple[int, int, int]  # (records, chars, approx tokens) of an output


def record_totals(rec: Record) -> Totals:
    """What one output record adds to its output's stats (summed by `sum_totals`, locally or in a combine)."""
    return 1, len(rec["text"]), approx_tokens(rec["text"])


def sum_totals(parts: Iterable[Totals]) -> Totals:
    """Sum of `record_totals` (or of partial sums: associative, so Beam can combine it in parts)."""
    r = c = t = 0
    for n, chars, tokens in parts:
        r, c, t = r + n, c + chars, t + tokens
    return r, c, t


def summarize(n_input: int, drop_reasons: Mapping[str, int], outputs: Mapping[str, Totals],
              bad: Mapping[str, Any], cluster_hist: Mapping[str, int]) -> dict[str, Any]:
    """Stats report: per-stage seen/kept/dropped-by-reason, output char/token counts, bad input.

    From counters only (``drop_reasons``: ``'<stage>/<reason>'`` -> records; ``outputs``: name -> totals),
    so the Beam runner computes them as combines without gathering records."""
    by_stage: dict[str, Counter[str]] = {s: Counter() for s in STAGES}
    for dropped_by, n in drop_reasons.items():
        stage, reason = dropped_by.split("/", 1)
        by_stage[stage][reason] += n
    stages, seen = {}, n_input
    for s in STAGES:
        d = sum(by_stage[s].values())
        stages[s] = {"seen": seen, "kept": seen - d, "dropped": dict(sorted(by_stage[s].items()))}
        seen -= d
    stages["dedup"]["cluster_size_histogram"] = dict(cluster_hist)
    out = {name: {"records": r, "chars": c, "approx_tokens": t} for name, (r, c, t) in outputs.items()}
    return {"input_records": n_input, "bad_input": dict(bad), "stages": stages, "outputs": out}


def process(records: list[Record], cfg: PipelineConfig) -> tuple[dict[str, list[Record]], list[Record], dict[str, int]]:
    """Run all stages on in-memory records: ({'text': ..., 'code': ...}, dropped, cluster hist)."""
    stages = Stages(cfg)
    dropped: list[Record] = []
    survivors = []
    for r in records:
        reason = stages.rules(r)
        (dropped.append(_drop(r, "rules", reason)) if reason else survivors.append(r))
    log.info("rules: %d of %d records kept", len(survivors), len(records))
    kept, dd, hist = dedup_records(survivors, cfg)
    dropped += dd
    log.info("dedup: %d kept, %d duplicates dropped", len(kept), len(dd))
    final_text, final_code = [], []
    for r in kept:
        res = stages.post_dedup(r)
        if res:
            dropped.append(_drop(r, *res))
        else:
            (final_code if r["type"] == "code" else final_text).append(r)
    log.info("safety/quality/long text/code tiers: %d text and %d code records kept", len(final_text),
             len(final_code))
    outputs = {"text": sorted(final_text, key=lambda r: r["id"]),
               "code": sorted(code_documents(final_code, cfg.code_context_chars), key=lambda r: r["id"])}
    return outputs, sorted(dropped, key=lambda r: r["id"]), hist


def commit_outputs(workdir: str | pathlib.Path, staging: pathlib.Path, shards: Iterable[Shard],
                   stats: dict[str, Any]) -> dict[str, Any]:
    """The last step of both runners: lists the staged shards in ``stats['files']`` (per output, in
    `layout.OUTPUT_FORMATS` order, by path) and commits them with ``stats.json`` and, last,
    ``manifest.json`` (`output.commit`); returns the manifest. Needs the shards' metadata only."""
    shards = list(shards)
    by_output = {name: sorted((s for s in shards if s.output == name), key=lambda s: s.path)
                 for name in layout.OUTPUT_FORMATS}
    stats["files"] = {name: [pathlib.Path(s.path).relative_to(staging).as_posix() for s in group]
                      for name, group in by_output.items()}
    manifest = output.commit(workdir, staging, by_output, stats)
    log.info("committed %s (%d shard files)", pathlib.Path(workdir) / output.MANIFEST, len(manifest["shards"]))
    return manifest


def write_outputs(workdir: str | pathlib.Path, outputs: Mapping[str, list[Record]], dropped: list[Record],
                  stats: dict[str, Any], records_per_shard: int) -> dict[str, list[str]]:
    """Shards for each output (ArrayRecord + JSONL), rejects as JSONL, ``stats.json`` and, last,
    ``manifest.json``: staged, then committed (:mod:`.output`); returns the paths of the shards."""
    work = pathlib.Path(workdir)
    staging = output.new_staging(work)
    everything = {**outputs, "rejected": dropped}
    log.info("writing %s to %s", ", ".join(f"{len(rs)} {name}" for name, rs in everything.items()), staging)
    try:
        try:
            shards = [s for name, rs in everything.items()
                      for s in write_shards(rs, staging, name, records_per_shard=records_per_shard)]
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)  # nothing committed: the previous output stays as it was
            raise
        commit_outputs(work, staging, shards, stats)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise output.OutputDiskFullError(
            f"disk full writing {e.filename or staging} ({e.strerror}); the previous output in {work} is "
            "unchanged: free space and run the same command") from None
    return {k: [str(work / f) for f in v] for k, v in stats["files"].items()}


def run_local(sources: Sequence[Mapping[str, Any]], workdir: str | pathlib.Path,
              cfg: PipelineConfig = PipelineConfig()) -> dict[str, Any]:
    """Read, process and write everything in this process; returns the stats report."""
    check_sources(sources)
    bad = BadInput()
    log.info("reading %d source(s)", len(sources))
    records = list(read_sources(sources, bad))
    check_not_empty(len(records), bad.to_dict())
    log.info("read %d records from %d file(s); processing (rules, dedup, safety, quality, long text, code)",
             len(records), bad.files_read)
    outputs, dropped, hist = process(records, cfg)
    stats = summarize(len(records), Counter(r["meta"]["dropped_by"] for r in dropped),
                      {name: sum_totals(map(record_totals, rs)) for name, rs in outputs.items()}, bad.to_dict(), hist)
    write_outputs(workdir, outputs, dropped, stats, cfg.records_per_shard)
    return stats
