"""Evaluation: `python -m experiments.eval --gin experiments/configs/eval/tiny.gin [--workdir DIR]`.

Writes `results.json`, `needle.png` and `scores.png` into the workdir (default runs/eval_<config name>).
Exit status 1 when a suite failed (its error is in results.json).
"""

from __future__ import annotations

import json
import sys

from experiments.cli import entry_point, parse_args, say
from internlm2_jax.eval.runner import (  # registers evaluate + the suites with gin before parsing
    evaluate, summary_scores,
)


@entry_point
def main(argv=None) -> int:
    args = parse_args(__doc__, default_gin="eval/tiny.gin", argv=argv)
    results = evaluate(args.workdir)
    failed = {k: v["error"] for k, v in results["suites"].items() if "error" in v}
    summary = {"workdir": args.workdir, "plots": results["plots"], "failed": failed,
               "seconds": round(results["metadata"]["total_seconds"], 1)}
    print(json.dumps(summary))
    for name, score in summary_scores(results["suites"]).items():
        say(f"{name:<40} {score:.3f}")
    for name, error in failed.items():
        say(f"suite {name} FAILED: {error.splitlines()[0][:200]}")
    say(f"results in {args.workdir}/results.json" + (f", plots {', '.join(results['plots'])}" if results["plots"] else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
