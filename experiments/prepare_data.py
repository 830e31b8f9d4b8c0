"""Run the InternLM2 data pipeline (issue 6) from gin configs.

    python -m experiments.prepare_data --gin experiments/configs/data/tiny.gin \\
        [--gin_param 'PipelineConfig.dedup_threshold=0.8'] [--workdir DIR] [--runner DirectRunner]

``--runner local`` (default) runs in-process; any Beam runner name (DirectRunner, DataflowRunner,
FlinkRunner, SparkRunner) runs the same stages as Apache Beam transforms; extra pipeline options
go through ``prepare_data.beam_options``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sysconfig
from typing import Any

import gin

from internlm2_jax.data import filters, pipeline, synthetic

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
    work = pathlib.Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    specs = [dict(s) for s in sources]
    if synthetic_docs:
        paths = synthetic.write_corpus(work / "input", n_docs=synthetic_docs)
        specs.append({"kind": "jsonl", "paths": paths, "source": "synthetic"})
    if stdlib_packages:
        specs.append({"kind": "code_repo", "root": sysconfig.get_paths()["stdlib"], "source": "stdlib",
                      "repo": "cpython-lib", "include": list(stdlib_packages), "extensions": [".py"]})
    cfg = PipelineConfig()
    if quality_reference_docs:
        import dataclasses

        cfg = dataclasses.replace(cfg, quality_reference=tuple(synthetic.reference_texts(quality_reference_docs)))
    if runner == "local":
        return pipeline.run_local(specs, work, cfg)
    from internlm2_jax.data import beam_pipeline

    return beam_pipeline.run_beam(specs, work, cfg, runner=runner, options=list(beam_options))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gin", action="append", default=[], help="gin config file (repeatable)")
    ap.add_argument("--gin_param", action="append", default=[], help="gin binding (repeatable)")
    ap.add_argument("--workdir", help="overrides prepare_data.workdir")
    ap.add_argument("--runner", help="overrides prepare_data.runner (local or a Beam runner)")
    args = ap.parse_args(argv)
    params = list(args.gin_param)
    if args.workdir:
        params.append(f"prepare_data.workdir = {args.workdir!r}")
    if args.runner:
        params.append(f"prepare_data.runner = {args.runner!r}")
    gin.parse_config_files_and_bindings(args.gin, params)
    stats = prepare_data()
    print(json.dumps({k: stats[k] for k in ("input_records", "bad_input", "outputs")}, indent=1))
    print(json.dumps({k: v["dropped"] for k, v in stats["stages"].items()}))


if __name__ == "__main__":
    main()
