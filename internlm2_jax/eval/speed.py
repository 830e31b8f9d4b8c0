"""Generation speed: prefill tokens/s and decode tokens/s at several batch sizes.

Prefill is `prefill` on random prompts `[B, P]`; decode is a jitted `lax.fori_loop` of greedy
`decode_step`s from that cache (`N` steps, `B * N` tokens). Each is compiled and run once first
(not timed), then timed over `repeats` runs (median), blocking on the result.
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp

from internlm2_jax.config import ModelConfig
from internlm2_jax.model import decode_step, prefill


@functools.partial(jax.jit, static_argnames=("config", "max_len"))
def _prefill(config: ModelConfig, params: Any, tokens: jax.Array, *, max_len: int) -> tuple[jax.Array, Any]:
    """tokens `[B, P]` → (next tokens `[B]` greedy, cache of `max_len` slots)."""
    logits, cache = prefill(config, params, tokens, max_len=max_len)
    return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), cache


@functools.partial(jax.jit, static_argnames=("config", "steps"))
def _decode(config: ModelConfig, params: Any, cache: Any, tok: jax.Array, *, steps: int) -> jax.Array:
    """`steps` greedy decode steps from `tok [B]`; returns the last tokens `[B]`."""
    def body(_, carry):
        tok, cache = carry
        logits, cache = decode_step(config, params, cache, tok)
        return jnp.argmax(logits, axis=-1).astype(jnp.int32), cache

    return jax.lax.fori_loop(0, steps, body, (tok, cache))[0]


def _timed(fn: Callable[[], Any], repeats: int) -> float:
    jax.block_until_ready(fn())  # compile + warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_speed(config: ModelConfig, params: Any, *, batch_size: int, prompt_len: int, new_tokens: int,
                  repeats: int = 3, seed: int = 0) -> dict[str, float]:
    """One batch size: `{"batch_size", "prompt_len", "new_tokens", "prefill_s", "prefill_tokens_per_s",
    "decode_s", "decode_tokens_per_s", "ms_per_decode_step"}`."""
    params = nn.meta.unbox(params)
    vocab = config.vocab_size
    tokens = jax.random.randint(jax.random.key(seed), (batch_size, prompt_len), 3, max(vocab, 4), jnp.int32)
    max_len = prompt_len + new_tokens
    prefill_s = _timed(lambda: _prefill(config, params, tokens, max_len=max_len), repeats)
    first, cache = _prefill(config, params, tokens, max_len=max_len)
    decode_s = _timed(lambda: _decode(config, params, cache, first, steps=new_tokens), repeats)
    return {"batch_size": batch_size, "prompt_len": prompt_len, "new_tokens": new_tokens,
            "prefill_s": prefill_s, "prefill_tokens_per_s": batch_size * prompt_len / prefill_s,
            "decode_s": decode_s, "decode_tokens_per_s": batch_size * new_tokens / decode_s,
            "ms_per_decode_step": 1000.0 * decode_s / new_tokens}


@gin.configurable(denylist=["config", "params", "tok"])
def speed_suite(config: ModelConfig, params: Any, tok: Any = None, *, batch_sizes: Sequence[int] = (1, 4),
                prompt_len: int = 128, new_tokens: int = 32, repeats: int = 3) -> dict[str, Any]:
    """`measure_speed` per batch size; `tok` is unused (uniform suite signature)."""
    del tok
    runs = [measure_speed(config, params, batch_size=int(b), prompt_len=prompt_len, new_tokens=new_tokens,
                          repeats=repeats) for b in batch_sizes]
    return {"device": str(jax.devices()[0].device_kind), "runs": runs,
            "best_decode_tokens_per_s": max(r["decode_tokens_per_s"] for r in runs),
            "best_prefill_tokens_per_s": max(r["prefill_tokens_per_s"] for r in runs)}
