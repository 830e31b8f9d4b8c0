"""Quality scoring: perplexity-based scorers behind one log-prob interface.

``LogProbFn``: ``fn(list_of_token_id_lists) -> list of arrays``; for a sequence ``s`` it returns
``len(s) - 1`` log-probs, entry ``t - 1`` being ``log P(s[t] | s[:t])``. Sequences start with a
BOS/start token that is not scored. Implementations:

* :class:`NgramLM`: a numpy/dict n-gram LM (interpolated Dirichlet smoothing, i.e. add-k backing
  off to the lower order) with an optional *cache* component that adapts to the tokens already
  seen in the sequence -- so, like a neural LM, it uses long context.
* :func:`model_logprob_fn`: adapter for the InternLM2 model (``internlm2_jax.forward``).

:class:`QualityFilter` drops records whose score is below a per-type threshold.
"""

from __future__ import annotations

import math
import re
import zlib
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from .records import Record
from .safety import TextClassifier

LogProbFn = Callable[[list[list[int]]], list[np.ndarray]]
BOS = 0
_WORD_RE = re.compile(r"[\u3400-\u9fff]|\w+|[^\w\s]")


def char_encode(text: str) -> list[int]:
    """``[BOS] + code points + 1``."""
    return [BOS] + [ord(c) + 1 for c in text]


def word_encode(text: str) -> list[int]:
    """``[BOS] +`` stable word hashes (lower-cased words, punctuation and CJK chars as tokens)."""
    return [BOS] + [zlib.crc32(w.encode("utf-8")) + 1 for w in _WORD_RE.findall(text.lower())]


class NgramLM:
    """N-gram LM: ``p_n(c|h) = (C(h,c) + beta * p_{n-1}(c|h')) / (C(h) + beta)`` down to an add-k
    unigram over at least ``min_vocab`` types; with ``cache_weight > 0`` mixed with the same recursion over counts of the sequence
    being scored (a cache LM), so earlier context raises the probability of repeated content."""

    def __init__(self, order: int = 3, *, k: float = 0.5, beta: float = 2.0,
                 cache_weight: float = 0.0, cache_order: int = 2, min_vocab: int = 1 << 16):
        self.order, self.k, self.beta, self.min_vocab = order, k, beta, min_vocab
        self.cache_weight, self.cache_order = cache_weight, cache_order
        self.counts: list[dict[tuple[int, ...], dict[int, int]]] = [defaultdict(dict) for _ in range(order)]
        self.totals: list[dict[tuple[int, ...], int]] = [defaultdict(int) for _ in range(order)]
        self.vocab: set[int] = set()

    def fit(self, seqs: Iterable[Sequence[int]]) -> NgramLM:
        """Accumulate counts of all n-grams (orders 1..order) of ``seqs``."""
        for s in seqs:
            for t in range(1, len(s)):
                c = s[t]
                self.vocab.add(c)
                for n in range(self.order):
                    if t - n < 0:
                        break
                    h = tuple(s[t - n : t])
                    d = self.counts[n][h]
                    d[c] = d.get(c, 0) + 1
                    self.totals[n][h] += 1
        return self

    def _static(self, s: Sequence[int], t: int) -> float:
        c = s[t]
        v = max(len(self.vocab) + 1, self.min_vocab)  # unseen tokens share the add-k mass
        p = (self.counts[0][()].get(c, 0) + self.k) / (self.totals[0][()] + self.k * v)
        for n in range(1, self.order):
            if t - n < 0:
                break
            h = tuple(s[t - n : t])
            tot = self.totals[n].get(h, 0)
            if tot == 0:
                break
            p = (self.counts[n][h].get(c, 0) + self.beta * p) / (tot + self.beta)
        return p

    def logprobs(self, s: Sequence[int]) -> np.ndarray:
        """``log P(s[t] | s[:t])`` for ``t >= 1``."""
        out = np.empty(max(len(s) - 1, 0))
        cache_c: list[dict[tuple[int, ...], dict[int, int]]] = [defaultdict(dict) for _ in range(self.cache_order)]
        cache_t: list[dict[tuple[int, ...], int]] = [defaultdict(int) for _ in range(self.cache_order)]
        lam = self.cache_weight
        for t in range(1, len(s)):
            p = self._static(s, t)
            if lam > 0:
                pc = p
                for n in range(self.cache_order):
                    if t - n < 0:
                        break
                    h = tuple(s[t - n : t])
                    tot = cache_t[n].get(h, 0)
                    if tot == 0:
                        break
                    pc = (cache_c[n][h].get(s[t], 0) + self.beta * pc) / (tot + self.beta)
                p = (1 - lam) * p + lam * pc
                for n in range(self.cache_order):
                    if t - n < 0:
                        break
                    h = tuple(s[t - n : t])
                    d = cache_c[n][h]
                    d[s[t]] = d.get(s[t], 0) + 1
                    cache_t[n][h] += 1
            out[t - 1] = math.log(p)
        return out

    def __call__(self, seqs: list[list[int]]) -> list[np.ndarray]:
        return [self.logprobs(s) for s in seqs]


def model_logprob_fn(config: Any, params: Any, tokenizer: Any = None, *, batch_size: int = 8,
                     pad_id: int = 0) -> LogProbFn:
    """A :data:`LogProbFn` backed by ``internlm2_jax.forward(config, params, tokens)``.

    Sequences are right-padded with ``pad_id`` to a common length per batch (padding only
    follows real tokens, so causal attention keeps real positions exact). ``tokenizer`` is
    accepted for symmetry with the encoders (its ``bos_id`` is not needed here).
    """
    import jax
    import jax.numpy as jnp

    from internlm2_jax import forward

    @jax.jit
    def _lp(p: Any, tokens: jax.Array) -> jax.Array:
        logits = forward(config, p, tokens)
        logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
        return jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]

    def fn(seqs: list[list[int]]) -> list[np.ndarray]:
        out: list[np.ndarray] = []
        for i in range(0, len(seqs), batch_size):
            chunk = seqs[i : i + batch_size]
            width = max(2, max(len(s) for s in chunk))
            arr = np.full((len(chunk), width), pad_id, dtype=np.int32)
            for j, s in enumerate(chunk):
                arr[j, : len(s)] = s
            lp = np.asarray(_lp(params, jnp.asarray(arr)))
            out += [lp[j, : max(len(s) - 1, 0)] for j, s in enumerate(chunk)]
        return out

    return fn


class PerplexityScorer:
    """Score = mean per-token log-prob (higher is better) under ``logprob_fn``."""

    def __init__(self, logprob_fn: LogProbFn, encode: Callable[[str], list[int]] = char_encode,
                 max_tokens: int = 4096):
        self.logprob_fn, self.encode, self.max_tokens = logprob_fn, encode, max_tokens

    def score(self, texts: Sequence[str]) -> np.ndarray:
        seqs = [self.encode(t)[: self.max_tokens] for t in texts]
        return np.array([lp.mean() if lp.size else -np.inf for lp in self.logprob_fn(seqs)])


class QualityFilter:
    """Drop (reason ``low_quality``) when ``scorer.score`` is below the record type's threshold."""

    def __init__(self, scorer: TextClassifier, thresholds: Mapping[str, float], default: float = -np.inf):
        self.scorer, self.thresholds, self.default = scorer, dict(thresholds), default

    def reasons(self, records: Sequence[Record]) -> list[str | None]:
        scores = self.scorer.score([r["text"] for r in records]) if records else []
        return [None if s >= self.thresholds.get(r["type"], self.default) else "low_quality"
                for r, s in zip(records, scores)]
