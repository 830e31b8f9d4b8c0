"""Batched sampling with the KV cache: greedy / temperature / top-k / top-p, repetition penalty, stop ids.

The per-token sampler (sort-free, see `internlm2_jax.sampling`) is re-exported here for older imports.

Everything after tokenization runs in one jitted function with fixed-size buffers: right-padded prompts
`[B, P]` go through `prefill_last` (in chunks of `prefill_chunk` tokens, so a long prompt never holds `[P, P]`
attention scores nor `[B, P, vocab]` logits), then a `jax.lax.while_loop` over `decode_step` fills an output
buffer `[B, max_new_tokens]` and keeps per-row `done` flags (a row is done after emitting a stop id).
`P` is rounded up to a multiple of `PROMPT_BUCKET` so different prompt lengths reuse compilations.
"""

from __future__ import annotations

import functools
from typing import Any, Iterator, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from internlm2_jax.config import ModelConfig
from internlm2_jax.model import decode_step, prefill_last
from internlm2_jax.sampling import apply_repetition_penalty, mask_vocab, sample_logits  # noqa: F401 (re-exported)

PROMPT_BUCKET = 16
PREFILL_CHUNK = 1024  # prompt tokens per prefill step
STREAM_CACHE_BUCKET = 256


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


MAX_STOP_IDS = 8


def _knobs(temperature: float, top_k: int, top_p: float, repetition_penalty: float,
           vocab_limit: Optional[int]) -> dict[str, jax.Array]:
    return dict(temperature=jnp.float32(temperature), top_k=jnp.int32(top_k), top_p=jnp.float32(top_p),
                repetition_penalty=jnp.float32(repetition_penalty),
                vocab_limit=jnp.int32(-1 if vocab_limit is None else vocab_limit))


def _prepare(logits: jax.Array, seen: jax.Array, knobs: dict[str, jax.Array]) -> jax.Array:
    """Repetition penalty, then ids >= `vocab_limit` (tokenizer smaller than the embedding) masked out."""
    return mask_vocab(apply_repetition_penalty(logits, seen, knobs["repetition_penalty"]), knobs["vocab_limit"])


def _next_tokens(last: jax.Array, seen: jax.Array, knobs: dict[str, jax.Array], rng: jax.Array) -> jax.Array:
    """Tokens `[B]` from the last logits `[B, V]`: `_prepare`, then the sort-free sampler (one key per row).

    Shared by `generate` and `generate_stream`, so both draw the same tokens from the same key."""
    return sample_logits(_prepare(last, seen, knobs), rng, temperature=knobs["temperature"], top_k=knobs["top_k"],
                         top_p=knobs["top_p"])


def _stop_array(stop_ids: Sequence[int]) -> jax.Array:
    if len(stop_ids) > MAX_STOP_IDS:
        raise ValueError(f"at most {MAX_STOP_IDS} stop ids, got {len(stop_ids)}")
    return jnp.asarray(list(stop_ids) + [-1] * (MAX_STOP_IDS - len(stop_ids)), jnp.int32)


def _generate_impl(config: ModelConfig, params: Any, tokens: jax.Array, lengths: jax.Array, rng: jax.Array,
                  stops: jax.Array, knobs: dict[str, jax.Array], *, max_new_tokens: int, pad_id: int,
                  prefill_chunk: int = PREFILL_CHUNK) -> jax.Array:
    """tokens `[B, P]` right-padded, lengths `[B]` → generated ids `[B, max_new_tokens]` (pad after done)."""
    b, p = tokens.shape
    last, cache = prefill_last(config, params, tokens, max_len=p + max_new_tokens, lengths=lengths,
                               chunk=prefill_chunk)  # [B, V]
    v = last.shape[-1]
    valid = jnp.arange(p)[None] < lengths[:, None]
    seen = jnp.zeros((b, v), bool).at[jnp.arange(b)[:, None], tokens].max(valid)
    out = jnp.full((b, max_new_tokens), pad_id, jnp.int32)

    def cond(carry):
        i, _, _, done, _, _, _ = carry
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        i, out, last, done, seen, cache, rng = carry
        rng, sub = jax.random.split(rng)
        tok = jnp.where(done, pad_id, _next_tokens(last, seen, knobs, sub))
        out = out.at[:, i].set(tok)
        seen = seen.at[jnp.arange(b), tok].set(True)
        done = done | jnp.isin(tok, stops)
        last, cache = decode_step(config, params, cache, tok)
        return i + 1, out, last, done, seen, cache, rng

    init = (jnp.zeros((), jnp.int32), out, last, jnp.zeros((b,), bool), seen, cache, rng)
    return jax.lax.while_loop(cond, body, init)[1]


_STATIC = ("config", "max_new_tokens", "pad_id", "prefill_chunk")
_generate_jit = jax.jit(_generate_impl, static_argnames=_STATIC)


@functools.lru_cache(maxsize=8)
def _generate_on(mesh: Mesh) -> Any:
    """`_generate_impl` jitted with a replicated output on `mesh` (readable on every process)."""
    return jax.jit(_generate_impl, static_argnames=_STATIC, out_shardings=NamedSharding(mesh, P()))


def _pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt and every prompt needs >= 1 token")
    lengths = np.array([len(p) for p in prompts], np.int32)
    tokens = np.full((len(prompts), _round_up(int(lengths.max()), PROMPT_BUCKET)), pad_id, np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    return tokens, lengths


def generate(config: ModelConfig, params: Any, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, repetition_penalty: float = 1.0,
             stop_ids: Sequence[int] = (2,), rng: Optional[jax.Array] = None, pad_id: int = 0,
             vocab_limit: Optional[int] = None, mesh: Optional[Mesh] = None,
             prefill_chunk: int = PREFILL_CHUNK) -> list[list[int]]:
    """Samples continuations of a batch of token-id prompts.

    Returns, per prompt, the new tokens up to and including the first stop id (or `max_new_tokens`).
    `vocab_limit` (e.g. the tokenizer's size) forbids sampling ids at or above it.
    Params may be boxed (`init_params`) or plain. The cache holds `round_up(max prompt len, 16) +
    max_new_tokens` slots; the prompts go through `prefill_chunk` tokens at a time. `mesh`: params live on this
    (possibly multi-process) mesh; the prompts and knobs are
    placed replicated on it and the result comes back replicated, so every process gets every row.
    """
    tokens, lengths = _pad_prompts(prompts, pad_id)
    rng = jax.random.key(0) if rng is None else rng
    args = (jnp.asarray(tokens), jnp.asarray(lengths), rng, _stop_array(stop_ids),
            _knobs(temperature, top_k, top_p, repetition_penalty, vocab_limit))
    fn = _generate_jit
    if mesh is not None:
        args, fn = jax.device_put(args, NamedSharding(mesh, P())), _generate_on(mesh)
    out = fn(config, nn.meta.unbox(params), *args, max_new_tokens=int(max_new_tokens), pad_id=int(pad_id),
             prefill_chunk=int(prefill_chunk))
    stops = set(int(s) for s in stop_ids)
    result = []
    for row in np.asarray(out).tolist():
        ended = next((i for i, t in enumerate(row) if t in stops), None)
        result.append(row if ended is None else row[: ended + 1])
    return result


@functools.partial(jax.jit, static_argnames=("config",), donate_argnames=("cache",))
def _stream_step(config: ModelConfig, params: Any, cache: Any, last: jax.Array, seen: jax.Array,
                 rng: jax.Array, knobs: dict[str, jax.Array]):
    """Samples one token per row from `last [B, V]`, then feeds it through `decode_step`."""
    tok = _next_tokens(last, seen, knobs, rng)
    seen = seen.at[jnp.arange(tok.shape[0]), tok].set(True)
    last, cache = decode_step(config, params, cache, tok)
    return tok, last, seen, cache


@functools.partial(jax.jit, static_argnames=("config", "max_len", "chunk"))
def _stream_prefill(config: ModelConfig, params: Any, tokens: jax.Array, lengths: jax.Array, *, max_len: int,
                    chunk: int):
    last, cache = prefill_last(config, params, tokens, max_len=max_len, lengths=lengths, chunk=chunk)
    b, p = tokens.shape
    valid = jnp.arange(p)[None] < lengths[:, None]
    seen = jnp.zeros((b, last.shape[-1]), bool).at[jnp.arange(b)[:, None], tokens].max(valid)
    return last, seen, cache


def generate_stream(config: ModelConfig, params: Any, prompt: Sequence[int], *, max_new_tokens: int,
                    temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                    repetition_penalty: float = 1.0, stop_ids: Sequence[int] = (2,),
                    rng: Optional[jax.Array] = None, pad_id: int = 0,
             vocab_limit: Optional[int] = None) -> Iterator[int]:
    """Yields the new tokens of one prompt as they are sampled (ends after a stop id, which is yielded).

    Same sampling as `generate` (same rng stream, so the tokens match `generate` for batch size 1);
    the per-token step is jitted with a fixed cache of `round_up(round_up(len(prompt), 16) + max_new_tokens,
    STREAM_CACHE_BUCKET)` slots, so a multi-turn chat recompiles the step only when it crosses a bucket.
    """
    params = nn.meta.unbox(params)
    tokens, lengths = _pad_prompts([prompt], pad_id)
    rng = jax.random.key(0) if rng is None else rng
    last, seen, cache = _stream_prefill(config, params, jnp.asarray(tokens), jnp.asarray(lengths),
                                        max_len=_round_up(tokens.shape[1] + int(max_new_tokens),
                                                          STREAM_CACHE_BUCKET), chunk=PREFILL_CHUNK)
    stops = set(int(s) for s in stop_ids)
    knobs = _knobs(temperature, top_k, top_p, repetition_penalty, vocab_limit)
    for _ in range(int(max_new_tokens)):
        rng, sub = jax.random.split(rng)
        tok, last, seen, cache = _stream_step(config, params, cache, last, seen, sub, knobs)
        t = int(tok[0])
        yield t
        if t in stops:
            return
