"""Chat-format benchmarks from JSONL: one item a line, greedy answers scored by exact match or regex.

    {"id"?: str, "prompt": "What is 2+2?", "reference": "4", "scoring": "exact"}
    {"messages": [{"role": "system", ...}, {"role": "user", ...}], "reference": "^\\s*(yes|no)\\b",
     "scoring": "regex"}

`scoring` defaults to "exact" (`scoring.exact_match`: normalized text, numbers by value); "regex"
is `re.search(reference, output)`, case-insensitive.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import gin

from internlm2_jax.eval.scoring import exact_match, regex_match
from internlm2_jax.eval.tasks import run_examples
from internlm2_jax.tokenizer import Tokenizer

SCORERS = {"exact": exact_match, "regex": regex_match}


def load_items(path: str) -> list[dict[str, Any]]:
    """Validated items of a benchmark JSONL: each has `messages`, `reference`, `scoring`, `id`.

    Raises `ValueError` naming the file and line of the first malformed item.
    """
    items = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: bad JSON ({e})") from None
            if "messages" in rec:
                msgs = rec["messages"]
            elif isinstance(rec.get("prompt"), str):
                msgs = [{"role": "user", "content": rec["prompt"]}]
            else:
                raise ValueError(f"{where}: needs a 'prompt' string or a 'messages' list")
            if not isinstance(msgs, list) or not msgs or msgs[-1].get("role") != "user":
                raise ValueError(f"{where}: 'messages' must be a non-empty list ending with a user turn")
            if not isinstance(rec.get("reference"), str):
                raise ValueError(f"{where}: needs a 'reference' string")  # noqa: TRY004 - bad data, not a bug
            scoring = rec.get("scoring", "exact")
            if scoring not in SCORERS:
                raise ValueError(f"{where}: unknown scoring {scoring!r}; expected one of {sorted(SCORERS)}")
            if scoring == "regex":
                regex_match("", rec["reference"])  # fail early on a broken pattern
            items.append({"id": str(rec.get("id", f"{os.path.basename(path)}:{n}")), "messages": msgs,
                          "reference": rec["reference"], "scoring": scoring})
    if not items:
        raise ValueError(f"{path}: no benchmark items")
    return items


def score_items(items: Sequence[dict[str, Any]], outputs: Sequence[str]) -> list[bool]:
    """Per-item correctness of `outputs` under each item's scoring rule."""
    return [SCORERS[it["scoring"]](out, it["reference"]) for it, out in zip(items, outputs, strict=True)]


@gin.configurable(denylist=["config", "params", "tok"])
def chat_bench_suite(config: Any, params: Any, tok: Tokenizer, *, files: Sequence[str] = (),
                     max_new_tokens: int = 32, batch_size: int = 16, keep_samples: int = 5) -> dict[str, Any]:
    """Accuracy per JSONL file (benchmark name = file stem) and overall."""
    if not files:
        raise ValueError("chat_bench_suite.files is empty: bind it to one or more JSONL benchmarks")
    benches: dict[str, Any] = {}
    total, correct = 0, 0
    for path in files:
        items = load_items(path)
        outputs = run_examples(config, params, tok, [it["messages"] for it in items],
                               max_new_tokens=max_new_tokens, batch_size=batch_size)
        hits = score_items(items, outputs)
        name = os.path.splitext(os.path.basename(path))[0]
        benches[name] = {"accuracy": sum(hits) / len(hits), "n": len(hits), "samples": [
            {"id": it["id"], "reference": it["reference"], "scoring": it["scoring"], "output": o[:200], "correct": h}
            for it, o, h in list(zip(items, outputs, hits))[:keep_samples]]}
        total, correct = total + len(hits), correct + sum(hits)
    return {"accuracy": correct / total, "n": total, "benchmarks": benches}
