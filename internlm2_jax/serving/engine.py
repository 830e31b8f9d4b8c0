"""Continuous batching: a fixed number of decode slots, requests joining and leaving between steps.

One background thread runs the loop (JetStream's prefill / insert / generate split, with the insert folded
into the prefill: a request's prompt is written straight into its slot's rows of the shared cache):

    admit     queued requests take free slots (FIFO)
    prefill   one chunk of one admitted prompt (`prefill_chunk` tokens at most, length-bucketed to powers of
              two), so a long prompt never stalls the other slots' decoding for more than one chunk; the last
              chunk samples the request's first token
    decode    one jitted step for all slots: `tokens [slots]` → next tokens `[slots]`

Shapes never change with the traffic (slots, cache length and chunk buckets are fixed), so requests join and
leave without recompiling. Each slot samples with its own knobs and its own key (`fold_in(seed, n)` for its
n-th token) and every row of a step is computed independently, so a request's output does not depend on what
else is being served (tests/test_serving_engine.py checks greedy and seeded outputs against a request alone).

Cache: k/v `[layers, slots, max_len, kv_heads, head_dim]` (int8 plus per-token scales with `kv_cache='int8'`),
donated to every step (updated in place).
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import threading
import time
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from internlm2_jax.config import ModelConfig
from internlm2_jax.model import decode_step, extend, init_cache
from internlm2_jax.sampling import mask_vocab, sample_rows
from internlm2_jax.sft.quantize import IN_NDIM, dequantize, is_quantized, quantize_base

log = logging.getLogger(__name__)

MIN_CHUNK = 16
MIN_WINDOW = 64  # smallest cache window a decode step reads (fewer compilations for short requests)


class QueueFull(RuntimeError):
    """The engine's queue holds `max_queue` waiting requests (the server answers HTTP 429)."""


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Engine shape and limits (all fixed at start: they set the compiled shapes)."""

    slots: int = 8
    """Requests decoded together; more slots raise throughput until a step is compute-bound."""
    max_len: int = 1024
    """Cache positions per slot: a request's prompt plus `max_tokens` must fit."""
    prefill_chunk: int = 256
    """Longest prompt piece prefilled at once (a power of two ≥ 16); longer prompts go in pieces."""
    max_queue: int = 64
    """Requests waiting for a slot before `submit` raises `QueueFull`."""
    weights: str = "float"
    """'float' (as loaded), 'int8' (per-channel) or 'int4' (blockwise) weight-only quantized linear weights,
    stored packed and dequantized inside each step (`sft/quantize.py`)."""
    kv_cache: str = "model"
    """'model' (the compute dtype) or 'int8' (quantized per token and kv head; half of bf16's bytes, so about
    twice the slots or context in the same memory)."""
    log_every_s: float = 10.0
    """Seconds between throughput / queue log lines while busy."""

    def __post_init__(self) -> None:
        if self.slots < 1 or self.max_len < 2 or self.max_queue < 0:
            raise ValueError(f"EngineConfig: slots >= 1, max_len >= 2, max_queue >= 0; got {self}")
        c = self.prefill_chunk
        if c < MIN_CHUNK or c & (c - 1):
            raise ValueError(f"EngineConfig.prefill_chunk must be a power of two >= {MIN_CHUNK}, got {c}")
        if self.kv_cache not in ("model", "int8"):
            raise ValueError(f"EngineConfig.kv_cache must be 'model' or 'int8', got {self.kv_cache!r}")
        if self.weights not in ("float", "int8", "int4"):
            raise ValueError(f"EngineConfig.weights must be 'float', 'int8' or 'int4', got {self.weights!r}")


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling: temperature 0 is greedy; top_k 0 and top_p 1 switch those filters off."""

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    stop_ids: tuple[int, ...] = ()
    seed: Optional[int] = None

    def check(self) -> None:
        """Raises ValueError naming the first bad field."""
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not 0.0 <= self.temperature <= 100.0:
            raise ValueError(f"temperature must be in [0, 100], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")


@dataclasses.dataclass
class Event:
    """What a request's sink receives: each new token, then one final event with `finish_reason`
    ('stop' after a stop id, which is the last token; 'length'; 'cancelled'; 'error' with `error`)."""

    token: Optional[int] = None
    finish_reason: Optional[str] = None
    error: Optional[str] = None


@dataclasses.dataclass(eq=False)
class Request:
    """A submitted request; `cancel()` is safe from any thread (the slot frees before the next step)."""

    id: int
    prompt: list[int]
    sampling: SamplingParams
    sink: Callable[[Event], None]
    submitted: float = dataclasses.field(default_factory=time.monotonic)
    cancelled: bool = False
    generated: int = 0
    prefilled: int = 0
    last: int = 0  # the newest token: the next decode step's input
    key: Optional[np.ndarray] = None

    def cancel(self) -> None:
        self.cancelled = True


def _pow2_bucket(n: int, lo: int, hi: int) -> int:
    """The smallest power of two >= `n`, within [lo, hi] (prefill chunks and decode windows)."""
    return min(hi, max(lo, 1 << (max(n, 1) - 1).bit_length()))


class Engine:
    """Continuous-batching generation over `EngineConfig.slots` slots (see the module doc).

    `params` may be boxed or plain; `vocab_limit` (the tokenizer's size when smaller than the embedding)
    forbids sampling ids at or above it.
    """

    def __init__(self, config: ModelConfig, params: Any, engine: EngineConfig = EngineConfig(),
                 vocab_limit: Optional[int] = None):
        self.config, self.engine = config, engine
        params = nn.meta.unbox(params)
        if engine.weights != "float":
            params = quantize_base(params, tuple(IN_NDIM), 8 if engine.weights == "int8" else 4)
        self.params = params
        self.vocab_limit = config.vocab_size if vocab_limit is None else int(vocab_limit)
        cache = init_cache(config, engine.slots, engine.max_len, jnp.int8 if engine.kv_cache == "int8" else None)
        self._kv = {n: a for n, a in cache.items() if n != "lengths"}
        self._slot_req: list[Optional[Request]] = [None] * engine.slots
        self._queue: collections.deque[Request] = collections.deque()
        self._cond = threading.Condition()
        self._ids = itertools.count(1)
        self._thread: Optional[threading.Thread] = None
        self._running = False
        self._done_tokens = 0
        self._last_log = (time.monotonic(), 0)
        self._prefill = jax.jit(self._prefill_impl, donate_argnums=(1,))
        self._decode = jax.jit(self._decode_impl, donate_argnums=(1,), static_argnames=("window",))

    # ---- jitted pieces ---------------------------------------------------------------------------------

    def _plain(self, params: Any) -> Any:
        return jax.tree.map(dequantize, params, is_leaf=is_quantized)

    def _prefill_impl(self, params, kv, slot, start, tokens, n_valid, key, count, temp, top_k, top_p):
        """Writes `tokens [1, C]` (first `n_valid` real) into `slot` at `start`; samples the next token."""
        rows = {n: jax.lax.dynamic_slice_in_dim(a, slot, 1, axis=1) for n, a in kv.items()}
        logits, cache = extend(self.config, self._plain(params), {**rows, "lengths": start[None]}, tokens,
                               n_valid[None] - 1)
        kv = {n: jax.lax.dynamic_update_slice_in_dim(a, cache[n].astype(a.dtype), slot, axis=1)
              for n, a in kv.items()}
        keys = jax.random.fold_in(jax.random.wrap_key_data(key), count)[None]
        tok = sample_rows(mask_vocab(logits, self.vocab_limit), keys, temp[None], top_k[None], top_p[None])
        return tok[0], kv

    def _decode_impl(self, params, kv, lengths, tokens, keys, counts, temp, top_k, top_p, *, window):
        """One token for every slot: `tokens [S]` at `lengths [S]` → next tokens `[S]`.

        Attention reads only the first `window` cache positions (a power of two past every slot's length), so
        a step costs what the longest request uses, not `max_len`; the new entries are written in place.
        """
        logits, cache = decode_step(self.config, self._plain(params), {**kv, "lengths": lengths}, tokens,
                                    kv_window=window)
        keys = jax.vmap(jax.random.fold_in)(jax.random.wrap_key_data(keys), counts)
        kv = {n: cache[n] for n in kv}
        return sample_rows(mask_vocab(logits, self.vocab_limit), keys, temp, top_k, top_p), kv

    # ---- public API ------------------------------------------------------------------------------------

    def start(self) -> "Engine":
        if self._thread is None:
            self._running = True
            self._thread = threading.Thread(target=self._loop, name="internlm2-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stops the loop; requests still queued or running end with finish_reason 'cancelled'."""
        with self._cond:
            self._running = False
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        for req in list(self._queue) + [r for r in self._slot_req if r is not None]:
            req.sink(Event(finish_reason="cancelled"))
        self._queue.clear()
        self._slot_req = [None] * self.engine.slots

    def submit(self, prompt: Sequence[int], sampling: SamplingParams, sink: Callable[[Event], None]) -> Request:
        """Queues a request; raises ValueError (bad prompt or sampling) or QueueFull. `sink` is called from
        the engine thread with each `Event` and must return quickly."""
        sampling.check()
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise ValueError("the prompt is empty")
        if any(not 0 <= t < self.config.vocab_size for t in prompt):
            raise ValueError(f"prompt token ids must be in [0, {self.config.vocab_size})")
        room = self.engine.max_len - len(prompt)
        if sampling.max_tokens > room:
            raise ValueError(f"the prompt is {len(prompt)} tokens and max_tokens is {sampling.max_tokens}: "
                             f"together over the engine's context of {self.engine.max_len} tokens"
                             + (f" (at most {room} new tokens fit)" if room > 0 else ""))
        seed = sampling.seed if sampling.seed is not None else int(np.random.randint(0, 2**31 - 1))
        req = Request(next(self._ids), prompt, sampling, sink,
                      key=np.asarray(jax.random.key_data(jax.random.key(seed)), np.uint32))
        with self._cond:
            if len(self._queue) >= self.engine.max_queue:
                raise QueueFull(f"{len(self._queue)} requests are waiting (max_queue {self.engine.max_queue})")
            self._queue.append(req)
            self._cond.notify_all()
        return req

    def generate(self, prompt: Sequence[int], sampling: SamplingParams,
                 timeout: Optional[float] = None) -> tuple[list[int], str]:
        """Blocking: `(new tokens, finish_reason)` of one request (the engine must be started)."""
        out: list[int] = []
        done = threading.Event()
        reason: list[str] = []

        def sink(ev: Event) -> None:
            if ev.token is not None:
                out.append(ev.token)
            if ev.finish_reason is not None:
                reason.append(ev.finish_reason if ev.error is None else f"error: {ev.error}")
                done.set()

        req = self.submit(prompt, sampling, sink)
        if not done.wait(timeout):
            req.cancel()
            done.wait()
        return out, reason[0]

    def stats(self) -> dict[str, int]:
        with self._cond:
            return {"slots": self.engine.slots, "active": sum(r is not None for r in self._slot_req),
                    "queued": len(self._queue), "generated_tokens": self._done_tokens}

    # ---- the loop --------------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._admit()
                if not self._running:
                    return
                busy = any(r is not None for r in self._slot_req)
                if not busy:
                    self._cond.wait(0.5)
                    continue
            try:
                self._step()
            except Exception as e:  # a failed step fails its requests, never the server
                log.exception("engine step failed")
                for i, r in enumerate(self._slot_req):
                    if r is not None:
                        self._finish(i, "error", error=f"{type(e).__name__}: {e}")
            self._maybe_log()

    def _admit(self) -> None:
        """Moves queued requests into free slots (called with the lock held)."""
        for i in range(self.engine.slots):
            while self._slot_req[i] is None and self._queue:
                req = self._queue.popleft()
                if req.cancelled:
                    req.sink(Event(finish_reason="cancelled"))
                    continue
                self._slot_req[i] = req

    def _step(self) -> None:
        for i, r in enumerate(self._slot_req):  # cancellations free their slots first
            if r is not None and r.cancelled:
                self._finish(i, "cancelled")
        filling = [i for i, r in enumerate(self._slot_req) if r is not None and r.prefilled < len(r.prompt)]
        if filling:  # the request waiting longest gets the next chunk
            self._prefill_chunk(min(filling, key=lambda i: self._slot_req[i].submitted))
        decoding = [i for i, r in enumerate(self._slot_req) if r is not None and r.prefilled == len(r.prompt)
                    and r.generated > 0]
        if decoding:
            self._decode_all(decoding)

    def _prefill_chunk(self, i: int) -> None:
        req = self._slot_req[i]
        n = min(len(req.prompt) - req.prefilled, self.engine.prefill_chunk)
        # A padded chunk may run past the cache's end: those positions' writes are dropped (`model._append`).
        size = _pow2_bucket(n, MIN_CHUNK, self.engine.prefill_chunk)
        chunk = np.zeros((1, size), np.int32)
        chunk[0, :n] = req.prompt[req.prefilled:req.prefilled + n]
        s = req.sampling
        tok, self._kv = self._prefill(
            self.params, self._kv, np.int32(i), np.int32(req.prefilled), chunk, np.int32(n), req.key,
            np.int32(0), np.float32(s.temperature), np.int32(s.top_k), np.float32(s.top_p))
        req.prefilled += n
        if req.prefilled == len(req.prompt):
            self._emit(i, int(tok))

    def _slot_arrays(self) -> dict[str, np.ndarray]:
        """The decode step's per-slot inputs, read off the slots' requests. A decoding request has its prompt and
        all but its newest token in the cache, and draws its n-th token with `fold_in(key, n - 1)`. Idle and
        prefilling slots are greedy (no sampling work) and write one junk row at their length, overwritten later."""
        s = self.engine.slots
        a = {"lengths": np.zeros(s, np.int32), "tokens": np.zeros(s, np.int32), "keys": np.zeros((s, 2), np.uint32),
             "counts": np.zeros(s, np.int32), "temp": np.zeros(s, np.float32), "top_k": np.zeros(s, np.int32),
             "top_p": np.ones(s, np.float32)}
        for i, r in enumerate(self._slot_req):
            if r is None:
                continue
            a["lengths"][i] = r.prefilled + max(r.generated - 1, 0)
            if r.generated:
                a["tokens"][i], a["keys"][i], a["counts"][i] = r.last, r.key, r.generated
                a["temp"][i], a["top_k"][i], a["top_p"][i] = r.sampling.temperature, r.sampling.top_k, r.sampling.top_p
        return a

    def _decode_all(self, decoding: list[int]) -> None:
        a = self._slot_arrays()
        window = _pow2_bucket(int(a["lengths"].max()) + 1, MIN_WINDOW, self.engine.max_len)
        toks, self._kv = self._decode(self.params, self._kv, a["lengths"], a["tokens"], a["keys"], a["counts"],
                                      a["temp"], a["top_k"], a["top_p"], window=window)
        toks = np.asarray(toks)
        for i in decoding:
            self._emit(i, int(toks[i]))

    def _emit(self, i: int, tok: int) -> None:
        req = self._slot_req[i]
        req.generated += 1
        req.last = tok
        self._done_tokens += 1
        req.sink(Event(token=tok))
        if tok in req.sampling.stop_ids:
            self._finish(i, "stop")
        elif req.generated >= req.sampling.max_tokens:
            self._finish(i, "length")

    def _finish(self, i: int, reason: str, error: Optional[str] = None) -> None:
        req = self._slot_req[i]
        with self._cond:
            self._slot_req[i] = None
        req.sink(Event(finish_reason=reason, error=error))

    def _maybe_log(self) -> None:
        now = time.monotonic()
        t0, n0 = self._last_log
        if now - t0 >= self.engine.log_every_s:
            stats = self.stats()
            log.info("engine: %.1f tokens/s, %d/%d slots active, %d queued", (self._done_tokens - n0) / (now - t0),
                     stats["active"], stats["slots"], stats["queued"])
            self._last_log = (now, self._done_tokens)
