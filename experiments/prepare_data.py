"""Run the InternLM2 data pipeline (issue 6) from gin configs.

    python -m experiments.prepare_data --gin experiments/configs/data/tiny.gin \\
        [--gin_param 'PipelineConfig.dedup_threshold=0.8'] [--workdir DIR] [--runner DirectRunner]
    python -m experiments.prepare_data --verify DIR     # complete output? (manifest + checksums)

``--runner local`` (default) runs in-process; any Beam runner name (DirectRunner, DataflowRunner,
FlinkRunner, SparkRunner) runs the same stages as Apache Beam transforms; extra pipeline options
go through ``prepare_data.beam_options``; ``PipelineConfig.dedup_max_rounds`` sets the Beam dedup's components
rounds.

Output: ``{workdir}/{text,code,rejected}/`` shards, ``stats.json`` and ``manifest.json`` (written last: a
killed run never passes for complete, see ``internlm2_jax.data.output``). Stdout: a JSON summary for
scripts; stderr: progress (INFO) and a few readable lines. Bad gin, a source pattern matching nothing or
no input record: one ``error:`` line, exit 2 (``docs/runbooks.md``, "Data pipeline faults").
"""

from __future__ import annotations

import argparse
import json
import logging
import pathlib
import sys
import sysconfig
from collections.abc import Sequence
from typing import Any, Optional

import gin

from experiments.cli import apply_gin, entry_point, say, setup_logging
from internlm2_jax.data import filters, output, pipeline, synthetic
from internlm2_jax.errors import ConfigValueError
from internlm2_jax.workdir_lock import WorkdirLock

log = logging.getLogger("experiments.prepare_data")

# Bind e.g. `PipelineConfig.dedup_threshold = 0.8` and `PipelineConfig.rules = @RuleConfig()`.
PipelineConfig = gin.external_configurable(pipeline.PipelineConfig, module="internlm2_jax.data")
RuleConfig = gin.external_configurable(filters.RuleConfig, module="internlm2_jax.data")


@gin.configurable
def prepare_data(
    workdir: str = gin.REQUIRED,
    sources: tuple[dict[str, Any], ...] = (),
    synthetic_docs: int = 0,
    stdlib_packages: tuple[str, ...] = (),
    quality_reference_docs: int = 0,
    runner: str = "local",
    beam_options: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Assemble sources (+ generated corpus, + stdlib packages as a code repository) and run.

    Returns the stats report (also written to ``{workdir}/stats.json``).
    """
    cfg = PipelineConfig()  # first: a bad value (e.g. dedup_max_rounds=0) is refused before any work
    work = pathlib.Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    specs = [dict(s) for s in sources]
    if synthetic_docs:
        log.info("writing a generated corpus of %d documents to %s", synthetic_docs, work / "input")
        paths = synthetic.write_corpus(work / "input", n_docs=synthetic_docs)
        specs.append({"kind": "jsonl", "paths": paths, "source": "synthetic"})
    if stdlib_packages:
        specs.append({"kind": "code_repo", "root": sysconfig.get_paths()["stdlib"], "source": "stdlib",
                      "repo": "cpython-lib", "include": list(stdlib_packages), "extensions": [".py"]})
    if quality_reference_docs:
        import dataclasses

        cfg = dataclasses.replace(cfg, quality_reference=tuple(synthetic.reference_texts(quality_reference_docs)))
    if not specs:
        raise ConfigValueError("prepare_data: nothing to read: bind prepare_data.sources (or synthetic_docs / "
                               "stdlib_packages)")
    with WorkdirLock(str(work)):  # two runs on one workdir would remove each other's staging folders
        if runner == "local":
            return pipeline.run_local(specs, work, cfg)
        from internlm2_jax.data import beam_pipeline

        return beam_pipeline.run_beam(specs, work, cfg, runner=runner, options=list(beam_options))


def summary_lines(workdir: str, stats: dict[str, Any]) -> list[str]:
    """A few human lines: where the output is, records in/out, repaired and re-encoded input."""
    outs = stats["outputs"]
    bad = stats["bad_input"]
    counts = bad["counts"]
    dropped = sum(sum(v["dropped"].values()) for v in stats["stages"].values())
    lines = [f"wrote {workdir} (manifest.json lists every shard; stats.json has the per-stage counts)",
             f"{stats['input_records']} records in from {bad['files_read']} file(s): "
             f"{outs['text']['records']} text + {outs['code']['records']} code documents out, {dropped} rejected "
             f"(rejected/)"]
    fixed = [f"{counts[k]} {what}" for k, what in (("undecodable_bytes", "undecodable byte(s) replaced by U+FFFD"),
                                                   ("lone_surrogates", "lone surrogate(s) replaced"))
             if counts.get(k)]
    skipped = {k: v for k, v in counts.items() if k not in ("undecodable_bytes", "lone_surrogates")}
    if fixed:
        lines.append("repaired input: " + ", ".join(fixed) + " (examples in stats.json bad_input)")
    if bad.get("encodings"):
        lines.append("decoded as non-UTF-8: " + ", ".join(f"{n} file(s) as {e}" for e, n in bad["encodings"].items()))
    if skipped:
        lines.append("bad input skipped: " + ", ".join(f"{n} {k}" for k, n in skipped.items()))
    return lines


@entry_point
def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parses flags and gin (a bad binding is one `error:` line, exit 2), runs, prints the JSON summary on
    stdout and a few readable lines on stderr."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gin", action="append", default=[], help="gin config file (repeatable)")
    ap.add_argument("--gin_param", action="append", default=[], help="gin binding (repeatable)")
    ap.add_argument("--workdir", help="overrides prepare_data.workdir")
    ap.add_argument("--runner", help="overrides prepare_data.runner (local or a Beam runner)")
    ap.add_argument("--verify", metavar="WORKDIR", help="only check that WORKDIR holds complete output (its "
                    "manifest.json and every shard's checksum); exit 0 or one error line, exit 2")
    args = ap.parse_args(argv)
    if args.verify:
        m = output.verify(args.verify)
        say(f"{args.verify}: complete: {len(m['shards'])} shard files, records {m['outputs']} "
            f"(run {m['run_id']}, {m['created']})")
        return 0
    if not args.gin:
        ap.error("at least one --gin FILE is required")
    params = list(args.gin_param)
    if args.workdir:
        params.append(f"prepare_data.workdir = {args.workdir!r}")
    if args.runner:
        params.append(f"prepare_data.runner = {args.runner!r}")
    setup_logging()
    apply_gin(args.gin, params)
    try:
        workdir = gin.query_parameter("prepare_data.workdir")
    except ValueError:
        raise ConfigValueError("prepare_data.workdir is not set: pass --workdir DIR or bind it in a gin file") from None
    stats = prepare_data()
    output.verify(workdir, checksums=False)  # committed and matching, or one error line
    print(json.dumps({k: stats[k] for k in ("input_records", "bad_input", "outputs")}, indent=1))
    print(json.dumps({k: v["dropped"] for k, v in stats["stages"].items()}))
    for line in summary_lines(workdir, stats):
        say(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
