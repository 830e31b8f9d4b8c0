"""`evaluate(workdir)`: load a model + tokenizer, run the configured suites, write results.json and plots.

Model sources (first that is set): `hf_path` (an HF InternLM2 folder, via `load_hf`), `checkpoint`
(any `params_loading` source: an Orbax workdir of any stage or its `checkpoints/` dir, an HF folder, a msgpack
file; needs `model`), else a fresh init of
`model` (smoke tests). Outputs in `workdir`:

    results.json     {"metadata": {...}, "suites": {name: result | {"error": ...}}, "plots": [...]}
    needle.png       the needle heat map (when the needle suite ran)
    scores.png       bar chart of the [0, 1] scores of all suites
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import gin
import jax

from internlm2_jax.config import ModelConfig
from internlm2_jax.eval import plots
from internlm2_jax.eval.chat_bench import chat_bench_suite
from internlm2_jax.eval.needle import needle_suite
from internlm2_jax.eval.perplexity import perplexity_suite
from internlm2_jax.eval.speed import speed_suite
from internlm2_jax.eval.tasks import tasks_suite
from internlm2_jax.tokenizer import Tokenizer

log = logging.getLogger(__name__)

SUITES: dict[str, Callable[..., dict[str, Any]]] = {
    "perplexity": perplexity_suite, "needle": needle_suite, "tasks": tasks_suite,
    "chat_bench": chat_bench_suite, "speed": speed_suite,
}


def load_model(model: ModelConfig | None, hf_path: str | None, checkpoint: str | None,
               checkpoint_step: int | None = None, dtype: str | None = None,
               seed: int = 0) -> tuple[ModelConfig, Any, str]:
    """`(config, plain params, source description)` from an HF folder, an Orbax workdir or a fresh init."""
    if hf_path:
        from internlm2_jax.hf_io import load_hf

        config, params = load_hf(hf_path, **({"dtype": dtype} if dtype else {}))
        return config, params, f"hf:{hf_path}"
    if model is None:
        raise ValueError("evaluate: bind evaluate.hf_path, or evaluate.model (with evaluate.checkpoint for "
                         "trained weights)")
    if dtype:
        model = dataclasses.replace(model, dtype=dtype)
    from internlm2_jax.model import init_params

    if checkpoint:
        from internlm2_jax.params_loading import load_policy, orbax_dir, single_device_abstract, source_kind

        shardings = jax.tree.map(lambda a: a.sharding, single_device_abstract(model))
        kind = source_kind(checkpoint)
        where = orbax_dir(checkpoint) if kind == "orbax" else checkpoint
        return model, load_policy(checkpoint, model, shardings, checkpoint_step), f"{kind}:{where}"
    return model, nn.meta.unbox(init_params(model, jax.random.key(seed))), f"init:seed={seed}"


def load_tokenizer(spec: str | None, config: ModelConfig, hf_path: str | None) -> Tokenizer:
    """`spec`: a `.model` path / folder, `"stdlib"` (the cached stdlib-corpus tokenizer of
    `config.vocab_size` pieces, as pretraining builds it), or None (the HF folder's tokenizer)."""
    if spec is None:
        if not hf_path:
            raise ValueError("evaluate.tokenizer is required unless evaluate.hf_path holds tokenizer.model")
        spec = hf_path
    if spec == "stdlib":
        from internlm2_jax.input.stdlib_corpus import (
            build_stdlib_corpus,
            ensure_tokenizer,
        )

        spec = ensure_tokenizer(build_stdlib_corpus(None), vocab_size=config.vocab_size)
    tok = Tokenizer(spec)
    tok.check_compatible(config.vocab_size)
    return tok


def _write_json(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, default=str)
    os.replace(tmp, path)


def summary_scores(suites: dict[str, Any]) -> dict[str, float]:
    """The [0, 1] headline numbers of the suites that ran (bar-chart input)."""
    out: dict[str, float] = {}
    for name, res in suites.items():
        if "error" in res:
            continue
        if name == "needle":
            out["needle (mean)"] = res["mean"]
        elif name == "perplexity":
            out["perplexity: next-token acc"] = res["accuracy"]
        elif name == "tasks":
            out.update({f"tasks: {t}": r["accuracy"] for t, r in res["tasks"].items()})
        elif name == "chat_bench":
            out.update({f"bench: {b}": r["accuracy"] for b, r in res["benchmarks"].items()})
    return out


@gin.configurable(denylist=["workdir"])
def evaluate(workdir: str, model: ModelConfig | None = None, hf_path: str | None = None,
             checkpoint: str | None = None, checkpoint_step: int | None = None,
             tokenizer: str | None = "stdlib", dtype: str | None = None,
             suites: Sequence[str] = ("perplexity", "needle", "tasks", "speed"), seed: int = 0,
             plot: bool = True, raise_errors: bool = False) -> dict[str, Any]:
    """Runs `suites` (keys of `SUITES`, each configured by its own gin function, e.g.
    `needle_suite.context_lengths`) and writes `workdir/results.json` (after every suite) and plots.

    A failing suite is recorded as `{"error": ...}` and the others still run (unless `raise_errors`).
    Returns the results dict.
    """
    unknown = [s for s in suites if s not in SUITES]
    if unknown:
        raise ValueError(f"unknown eval suites {unknown}; known: {sorted(SUITES)}")
    os.makedirs(workdir, exist_ok=True)
    t0 = time.perf_counter()
    config, params, source = load_model(model, hf_path, checkpoint, checkpoint_step, dtype, seed)
    tok = load_tokenizer(tokenizer, config, hf_path)
    from internlm2_jax.model import param_count

    meta = {"source": source, "tokenizer": tok.path, "params": param_count(config),
            "model": {k: str(v) for k, v in dataclasses.asdict(config).items()},
            "backend": jax.default_backend(), "suites": list(suites), "load_seconds": time.perf_counter() - t0,
            "gin": gin.config_str(), "timing": {}}
    results: dict[str, Any] = {"metadata": meta, "suites": {}, "plots": []}
    path = os.path.join(workdir, "results.json")
    for name in suites:
        log.info("eval suite %s ...", name)
        start = time.perf_counter()
        try:
            results["suites"][name] = SUITES[name](config, params, tok)
        except Exception as e:
            if raise_errors:
                raise
            log.error("suite %s failed: %s", name, e)
            results["suites"][name] = {"error": f"{type(e).__name__}: {e}",
                                       "traceback": traceback.format_exc(limit=8)}
        meta["timing"][name] = time.perf_counter() - start
        _write_json(path, results)
    if plot:
        needle = results["suites"].get("needle", {})
        if "grid" in needle:
            results["plots"].append(plots.needle_heatmap(
                needle["grid"], needle["context_lengths"], needle["depths"], os.path.join(workdir, "needle.png"),
                title=f"Needle in a haystack ({os.path.basename(source.rstrip('/'))})"))
        scores = summary_scores(results["suites"])
        if scores:
            results["plots"].append(plots.scores_bar_chart(scores, os.path.join(workdir, "scores.png")))
    meta["total_seconds"] = time.perf_counter() - t0
    _write_json(path, results)
    return results
