"""The InternLM2 decoder and its pure-functional API (init, forward, prefill, decode_step)."""

from __future__ import annotations

from typing import Any, Optional

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from internlm2_jax.config import ModelConfig
from internlm2_jax.layers.attention import Attention
from internlm2_jax.layers.mlp import FeedForward
from internlm2_jax.layers.norms import RMSNorm
from internlm2_jax.layers.params import constrain, logical_param
from internlm2_jax.layers.rope import rope_cos_sin

Params = Any  # nested dict whose leaves are `nn.LogicallyPartitioned` (or plain arrays)
Cache = dict[str, jax.Array]
"""{"k", "v": [layers, batch, max_len, kv_heads, head_dim], "lengths": [batch]}; an int8 cache adds
"k_scale", "v_scale": [layers, batch, max_len, kv_heads, 1] (`init_cache(dtype=jnp.int8)`)."""
KV_KEYS = ("k", "v", "k_scale", "v_scale")

_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    # The weight projections' outputs (the dots without batch dims; `linear` hides them from
    # `dots_with_no_batch_dims_saveable`, so they are saved by name).
    "minimal": jax.checkpoint_policies.save_only_these_names("qkv", "attn_out", "mlp_gate", "mlp_up", "mlp_out"),
    "save_qkv_attn": jax.checkpoint_policies.save_only_these_names("qkv", "attn"),
    "save_qkv_attn_mlp": jax.checkpoint_policies.save_only_these_names(
        "qkv", "attn", "attn_out", "mlp_gate", "mlp_up", "mlp_out"),
}


class DecoderBlock(nn.Module):
    """Pre-norm block: `h = x + attn(attention_norm(x))`; `out = h + ffn(ffn_norm(h))`."""

    config: ModelConfig
    kv_window: Optional[int] = None

    @nn.compact
    def __call__(self, x, cos, sin, segment_ids, cache, cache_starts):
        cfg = self.config
        norm = dict(eps=cfg.rms_norm_eps, dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype)
        attn, new_cache = Attention(cfg, self.kv_window, name="attention")(
            RMSNorm(**norm, name="attention_norm")(x), cos, sin, segment_ids, cache, cache_starts)
        h = x + attn
        out = h + FeedForward(cfg, name="feed_forward")(RMSNorm(**norm, name="ffn_norm")(h))
        return constrain(out, ("batch", "length", "embed")), new_cache


class InternLM2(nn.Module):
    """InternLM2 causal LM: `tokens [batch, seq]` → logits `[batch, seq, vocab]` (fp32)."""

    config: ModelConfig

    def _block_stack(self):
        cfg = self.config
        block = DecoderBlock
        if cfg.remat_policy != "none":
            block = nn.remat(block, policy=_REMAT_POLICIES[cfg.remat_policy], prevent_cse=not cfg.scan_layers)
        return block

    @nn.compact
    def __call__(
        self,
        tokens: jax.Array,
        positions: Optional[jax.Array] = None,
        segment_ids: Optional[jax.Array] = None,
        cache: Optional[Cache] = None,
        head: bool = True,
        logits_at: Optional[jax.Array] = None,
        kv_window: Optional[int] = None,
    ):
        """Runs the decoder.

        Args:
          tokens: int `[batch, seq]`.
          positions: int `[batch, seq]`; default `arange(seq)` (or the cache lengths onward).
          segment_ids: int `[batch, seq]`; documents with different ids never attend to each other.
          cache: from `init_cache`; the new tokens are appended at `cache["lengths"]`.
          head: False returns the final-normed hidden states `[batch, seq, embed]` instead of logits.
          logits_at: int `[batch]`: only that position of each row goes on (output seq 1), so the head does not
            produce logits nobody reads (chunked prefill wants the last real token's).
          kv_window: static; attention reads only the cache's first `kv_window` positions (every row's
            `lengths` must be below it), so a decode step costs what the longest row uses, not `max_len`.
        Returns:
          logits `[batch, seq, vocab]` fp32 (or hidden states), and the updated cache when given one.
        """
        cfg = self.config
        chex.assert_rank(tokens, 2)
        b, s = tokens.shape
        starts = None if cache is None else cache["lengths"]
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32)[None], (b, s))
            if starts is not None:
                positions = positions + starts[:, None]
        chex.assert_equal_shape([tokens, positions])
        if segment_ids is not None:
            chex.assert_equal_shape([tokens, segment_ids])
        cos, sin = rope_cos_sin(cfg, positions)

        embedding = logical_param(self, "tok_embeddings", nn.initializers.normal(cfg.initializer_range),
                                  (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), cfg.weight_dtype)
        # FSDP-gather the table first (only `vocab` stays sharded): the lookup is then a local masked gather +
        # reduce over `tensor`, rather than XLA replicating the `[B, S, D]` result over every device.
        embedding = constrain(embedding, ("vocab", None))
        x = jnp.take(embedding, tokens, axis=0).astype(cfg.compute_dtype)
        x = constrain(x, ("batch", "length", "embed"))

        block = self._block_stack()
        kv = None if cache is None else tuple(cache[n] for n in KV_KEYS if n in cache)
        if cfg.scan_layers:
            stack = nn.scan(
                block,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0 if kv is not None else nn.broadcast,
                         nn.broadcast),
                length=cfg.num_hidden_layers,
                unroll=_scan_unroll(cfg),
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(cfg, kv_window, name="layers")
            x, new_kv = stack(x, cos, sin, segment_ids, kv, starts)
        else:
            outs = []
            for i in range(cfg.num_hidden_layers):
                layer_kv = None if kv is None else tuple(t[i] for t in kv)
                x, layer_new = block(cfg, kv_window, name=f"layers_{i}")(x, cos, sin, segment_ids, layer_kv, starts)
                outs.append(layer_new)
            new_kv = None if kv is None else tuple(jnp.stack(t) for t in zip(*outs))

        x = RMSNorm(cfg.rms_norm_eps, cfg.compute_dtype, cfg.weight_dtype, name="norm")(x)
        if logits_at is not None:
            x = x[jnp.arange(b), logits_at][:, None]
        if head:
            kernel = logical_param(self, "output", nn.initializers.normal(cfg.initializer_range),
                                   (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), cfg.weight_dtype)
            x = jnp.einsum("bsd,dv->bsv", x, kernel.astype(cfg.compute_dtype),
                           preferred_element_type=jnp.float32)
            x = constrain(x, ("batch", "length", "vocab"))
        if cache is None:
            return x
        return x, _append(cache, new_kv, s)


def _scan_unroll(cfg: ModelConfig) -> int:
    """`cfg.scan_unroll`, or its default: all layers on a CPU host, one elsewhere (see `ModelConfig.scan_unroll`)."""
    if cfg.scan_unroll is not None:
        return min(cfg.scan_unroll, cfg.num_hidden_layers)
    return cfg.num_hidden_layers if jax.default_backend() == "cpu" else 1


def _append(cache: Cache, new_kv: tuple[jax.Array, ...], s: int) -> Cache:
    """Writes every layer's new entries `[layers, batch, s, ...]` at positions `lengths[b]` onward in one
    scatter: in place when the cache is donated or a loop carry (no layer's cache is copied). Positions past
    the cache's end are dropped (a padded chunk's tail)."""
    b = cache["lengths"].shape[0]
    rows = jnp.arange(b)[:, None]
    pos = cache["lengths"][:, None] + jnp.arange(s)[None]
    out = {n: cache[n].at[:, rows, pos].set(new.astype(cache[n].dtype), mode="drop")
           for n, new in zip(KV_KEYS, new_kv)}
    return {**out, "lengths": cache["lengths"] + s}


# ---- pure-functional API ---------------------------------------------------------------------------

def _wrap(params: Params) -> dict:
    return {"params": params}


def init_params(config: ModelConfig, rng: jax.Array) -> Params:
    """Freshly initialised params (leaves are `nn.LogicallyPartitioned` with logical axis names)."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    return InternLM2(config).init(rng, tokens)["params"]


def abstract_params(config: ModelConfig) -> Params:
    """`jax.ShapeDtypeStruct` tree of the params (no allocation), with logical axis metadata."""
    return jax.eval_shape(lambda: init_params(config, jax.random.key(0)))


def param_count(config: ModelConfig) -> int:
    """Total number of parameters, computed from shapes only."""
    leaves = jax.tree.leaves(nn.meta.unbox(abstract_params(config)))
    return int(sum(np.prod(x.shape) for x in leaves))


def logical_axes(params: Params) -> Any:
    """Tree of logical axis-name tuples matching `params` (unboxed leaves)."""
    return nn.get_partition_spec(params)


def forward(
    config: ModelConfig,
    params: Params,
    tokens: jax.Array,
    *,
    positions: Optional[jax.Array] = None,
    segment_ids: Optional[jax.Array] = None,
) -> jax.Array:
    """Logits `[batch, seq, vocab]` (fp32) for `tokens [batch, seq]`."""
    return InternLM2(config).apply(_wrap(params), tokens, positions, segment_ids)


def hidden_states(
    config: ModelConfig,
    params: Params,
    tokens: jax.Array,
    *,
    positions: Optional[jax.Array] = None,
    segment_ids: Optional[jax.Array] = None,
) -> jax.Array:
    """Final-normed hidden states `[batch, seq, embed]` (before the output head)."""
    return InternLM2(config).apply(_wrap(params), tokens, positions, segment_ids, head=False)


def init_cache(config: ModelConfig, batch: int, max_len: int, dtype: Any = None) -> Cache:
    """Empty fixed-size KV cache: k/v `[layers, batch, max_len, kv_heads, head_dim]`, lengths `[batch]`.

    `dtype=jnp.int8` stores k/v quantized (half of bf16's bytes) with fp32 scales per token and kv head.
    """
    shape = (config.num_hidden_layers, batch, max_len, config.num_key_value_heads, config.dim_per_head)
    dt = config.compute_dtype if dtype is None else jnp.dtype(dtype)
    cache = {"k": jnp.zeros(shape, dt), "v": jnp.zeros(shape, dt), "lengths": jnp.zeros((batch,), jnp.int32)}
    if dt == jnp.int8:
        for name in ("k_scale", "v_scale"):  # two buffers: the engine donates each
            cache[name] = jnp.zeros(shape[:-1] + (1,), jnp.float32)
    return cache


def prefill(
    config: ModelConfig,
    params: Params,
    tokens: jax.Array,
    *,
    max_len: int,
    lengths: Optional[jax.Array] = None,
) -> tuple[jax.Array, Cache]:
    """Runs right-padded prompts `tokens [batch, seq]` and fills a fresh cache of `max_len` slots.

    `lengths [batch]` are the true prompt lengths (default: all `seq`); the cache continues from
    there, so padding slots are overwritten by later decode steps. Returns logits `[batch, seq, vocab]`.
    """
    b, s = tokens.shape
    if s > max_len:
        raise ValueError(f"prompt length {s} exceeds cache size max_len={max_len}")
    cache = init_cache(config, b, max_len)
    logits, cache = InternLM2(config).apply(_wrap(params), tokens, None, None, cache)
    if lengths is not None:
        cache = {**cache, "lengths": jnp.asarray(lengths, jnp.int32)}
    return logits, cache


def prefill_last(
    config: ModelConfig,
    params: Params,
    tokens: jax.Array,
    *,
    max_len: int,
    lengths: Optional[jax.Array] = None,
    chunk: Optional[int] = None,
) -> tuple[jax.Array, Cache]:
    """Right-padded prompts `tokens [batch, seq]` → the next-token logits after each prompt `[batch, vocab]` (at
    `lengths - 1`) and a fresh cache of `max_len` positions holding the prompts.

    The prompts go through `chunk` tokens at a time (default: all at once) in a `lax.scan`: each chunk attends to
    the cache in blocks (`attention_core.CACHE_BLOCK`) and to itself, so a long prompt never holds `[seq, seq]`
    scores, and only one position per row reaches the output head (not `[batch, seq, vocab]` logits).
    """
    b, s = tokens.shape
    if s > max_len:
        raise ValueError(f"prompt length {s} exceeds cache size max_len={max_len}")
    lengths = jnp.full((b,), s, jnp.int32) if lengths is None else jnp.asarray(lengths, jnp.int32)
    chunk = s if chunk is None else max(1, min(int(chunk), s))
    n = -(-s // chunk)
    tokens = jnp.pad(tokens, ((0, 0), (0, n * chunk - s)))  # the tail's writes past max_len are dropped
    last = lengths - 1

    def one(carry, xs):
        cache, best = carry
        i, part = xs
        logits, cache = extend(config, params, cache, part, jnp.clip(last - i * chunk, 0, chunk - 1))
        here = (last >= i * chunk) & (last < (i + 1) * chunk)
        return (cache, jnp.where(here[:, None], logits, best)), None

    init = (init_cache(config, b, max_len), jnp.zeros((b, config.vocab_size), jnp.float32))
    (cache, logits), _ = jax.lax.scan(one, init, (jnp.arange(n), tokens.reshape(b, n, chunk).transpose(1, 0, 2)))
    return logits, {**cache, "lengths": lengths}


def decode_step(config: ModelConfig, params: Params, cache: Cache, tokens: jax.Array,
                kv_window: Optional[int] = None) -> tuple[jax.Array, Cache]:
    """One token per row: `tokens [batch]` at position `cache["lengths"]` → logits `[batch, vocab]`.

    `kv_window` (static): read only the cache's first positions, see `InternLM2.__call__`."""
    logits, cache = InternLM2(config).apply(_wrap(params), tokens[:, None], None, None, cache,
                                            kv_window=kv_window)
    return logits[:, 0], cache


def extend(config: ModelConfig, params: Params, cache: Cache, tokens: jax.Array,
           last: jax.Array) -> tuple[jax.Array, Cache]:
    """Appends `tokens [batch, chunk]` at `cache["lengths"]` (chunked prefill) → logits `[batch, vocab]` at `last`.

    `last [batch]` indexes the chunk position whose next-token logits are wanted (the last real token of a
    right-padded chunk). Only that row goes through the output head: a 512-token chunk at vocab 92544 would
    otherwise materialise 190 MB of logits. The returned cache's lengths advance by the full chunk; callers
    with padding set them to the true lengths (padding slots are overwritten by later writes).
    """
    logits, cache = InternLM2(config).apply(_wrap(params), tokens, None, None, cache, logits_at=last)
    return logits[:, 0], cache
