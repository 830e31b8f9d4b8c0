"""Perplexity on held-out text: the pretraining validation split or JSONL files, packed into rows.

Batches come from `make_pretrain_iterator(split="validation")` (unshuffled, one pass, packed
`[B, S]` rows with segment ids, so documents never attend across each other) and the loss is the
training `loss_fn` (chunked cross-entropy, token sums), so eval and train perplexity agree.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Iterable, Mapping
from typing import Any

import flax.linen as nn
import gin
import jax
import numpy as np

from internlm2_jax.config import ModelConfig
from internlm2_jax.input import InputConfig, make_pretrain_iterator
from internlm2_jax.tokenizer import Tokenizer
from internlm2_jax.train.causal_lm import StepConfig, loss_fn


@functools.partial(jax.jit, static_argnames=("config",))
def _loss_sums(config: ModelConfig, params: Any, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    _, sums = loss_fn(config, params, batch, StepConfig())
    return sums


def perplexity(config: ModelConfig, params: Any, batches: Iterable[dict[str, np.ndarray]],
               max_batches: int | None = None) -> dict[str, float]:
    """Token-weighted mean NLL over `batches` ({tokens, segment_ids, positions, loss_mask}: int32 `[B, S]`).

    Returns `{"loss", "perplexity", "accuracy", "tokens", "batches", "seconds"}`; `perplexity` is
    `exp(min(loss, 50))`. Stops after `max_batches` (None: the whole, finite, iterator).
    """
    params = nn.meta.unbox(params)
    loss_sum = count = correct = 0.0
    n = 0
    t0 = time.perf_counter()
    for batch in batches:
        if max_batches is not None and n >= max_batches:
            break
        sums = jax.device_get(_loss_sums(config, params, {k: np.asarray(v) for k, v in batch.items()}))
        loss_sum += float(sums["loss_sum"])
        count += float(sums["count"])
        correct += float(sums["correct"])
        n += 1
    if count == 0:
        raise ValueError("perplexity: the held-out data gave no target tokens")
    mean = loss_sum / count
    return {"loss": mean, "perplexity": math.exp(min(mean, 50.0)), "accuracy": correct / count,
            "tokens": int(count), "batches": n, "seconds": time.perf_counter() - t0}


def heldout_config(sources: Mapping[str, str], *, seq_len: int, batch_size: int,
                   base: InputConfig | None = None) -> InputConfig:
    """An `InputConfig` reading `sources` (e.g. `{"stdlib": "stdlib:"}` or `{"val": "jsonl:/d/*.jsonl"}`)
    synchronously (no reader threads / prefetch, so runs are reproducible and light)."""
    base = base or InputConfig()
    return dataclasses.replace(base, sources=dict(sources), seq_len=seq_len, global_batch_size=batch_size,
                               read_threads=0, prefetch_batches=0)


@gin.configurable(denylist=["config", "params", "tok"])
def perplexity_suite(config: ModelConfig, params: Any, tok: Tokenizer, *,
                     sources: Mapping[str, str] = {"stdlib": "stdlib:"},
                     jsonl: str | None = None, text_field: str = "text", seq_len: int = 128,
                     batch_size: int = 4, max_batches: int | None = 8) -> dict[str, Any]:
    """Held-out perplexity. `jsonl` (a path/glob, overriding `sources`) reads `text_field` of each line;
    otherwise `sources` is read with split "validation" (`{split}` in a URI becomes "validation")."""
    srcs = {"jsonl": f"jsonl:{jsonl}"} if jsonl else dict(sources)
    cfg = heldout_config(srcs, seq_len=seq_len, batch_size=batch_size,
                         base=InputConfig(text_field=text_field))
    it = make_pretrain_iterator(cfg, tokenizer=tok, split="validation", shard_index=0, shard_count=1)
    result = perplexity(config, params, it, max_batches=max_batches)
    return {**result, "sources": srcs, "seq_len": seq_len, "batch_size": batch_size}
