"""Long-text filter (texts >= 32 KB): statistical rules, then the coherence (perplexity) test.

Coherence, as in the report: split the text at a paragraph boundary into S1 | S2 and compare
``log P(S2 | S1)`` with ``log P(S2)``; a coherent text's preceding segment makes the next one more
likely. We average the per-token gain ``(log P(S2|S1) - log P(S2)) / |S2|`` over ``num_splits``
evenly spaced boundaries, using the last ``context_chars`` of S1 and the first ``target_chars``
of S2, and drop (reason ``long_incoherent``) when the gain is below the record type's margin in
``margins`` (nats/token). Any :data:`~.quality.LogProbFn` works (the cache n-gram LM in tests,
the InternLM2 model via :func:`~.quality.model_logprob_fn` at scale).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from .quality import LogProbFn, char_encode
from .records import Record

LONG_TEXT_BYTES = 32 * 1024
DEFAULT_MARGINS: dict[str, float] = {"web": 0.05, "book": 0.05, "techlit": 0.05, "code": 0.02}
_PARA_RE = re.compile(r"\n\s*\n")


def is_long(text: str, min_bytes: int = LONG_TEXT_BYTES) -> bool:
    return len(text.encode("utf-8")) >= min_bytes


def long_stats_reason(text: str, *, max_dup_para_frac: float = 0.3,
                      min_unique_chars: int = 20, max_line_len: int = 50_000) -> str | None:
    """Statistical rules for long texts: repeated paragraphs, tiny alphabets, giant lines."""
    paras = [p.strip() for p in _PARA_RE.split(text) if p.strip()]
    if paras and 1 - len(set(paras)) / len(paras) > max_dup_para_frac:
        return "long_dup_paragraphs"
    if len(set(text[:100_000])) < min_unique_chars:
        return "long_low_alphabet"
    if max((len(ln) for ln in text.splitlines()), default=0) > max_line_len:
        return "long_line"
    return None


def split_points(text: str, num_splits: int) -> list[int]:
    """Character offsets of paragraph boundaries nearest to evenly spaced positions."""
    bounds = [m.end() for m in _PARA_RE.finditer(text)]
    if not bounds:
        bounds = [m.end() for m in re.finditer(r"\n", text)] or [len(text) // 2]
    targets = [len(text) * (i + 1) / (num_splits + 1) for i in range(num_splits)]
    arr = np.asarray(bounds)
    return sorted({int(arr[np.abs(arr - t).argmin()]) for t in targets})


def coherence_gain(text: str, logprob_fn: LogProbFn, encode: Callable[[str], list[int]] = char_encode,
                   *, num_splits: int = 8, context_chars: int = 2000, target_chars: int = 1000) -> float:
    """Mean per-token ``log P(S2|S1) - log P(S2)`` over split points (see module docstring)."""
    seqs: list[list[int]] = []
    n_target: list[int] = []
    for cut in split_points(text, num_splits):
        s1, s2 = text[max(0, cut - context_chars) : cut], text[cut : cut + target_chars]
        e2 = encode(s2)  # [BOS] + S2 tokens
        joint = encode(s1) + e2[1:]
        seqs += [joint, e2]
        n_target.append(len(e2) - 1)
    lps = logprob_fn(seqs)
    gains = []
    for i, n in enumerate(n_target):
        if n <= 0:
            continue
        cond, alone = lps[2 * i][-n:], lps[2 * i + 1]
        gains.append((cond.sum() - alone.sum()) / n)
    return float(np.mean(gains)) if gains else 0.0


class LongTextFilter:
    """Applies to records of at least ``min_bytes``; shorter records pass untouched."""

    def __init__(self, logprob_fn: LogProbFn | None, encode: Callable[[str], list[int]] = char_encode, *,
                 margins: Mapping[str, float] = DEFAULT_MARGINS, min_bytes: int = LONG_TEXT_BYTES,
                 num_splits: int = 8, context_chars: int = 2000, target_chars: int = 1000):
        self.logprob_fn, self.encode = logprob_fn, encode
        self.margins, self.min_bytes = dict(margins), min_bytes
        self.kw = dict(num_splits=num_splits, context_chars=context_chars, target_chars=target_chars)

    def reason(self, record: Record) -> str | None:
        text = record["text"]
        if not is_long(text, self.min_bytes):
            return None
        r = long_stats_reason(text)
        if r is not None or self.logprob_fn is None:
            return r
        gain = coherence_gain(text, self.logprob_fn, self.encode, **self.kw)
        record.setdefault("meta", {})["coherence_gain"] = round(gain, 4)
        margin = self.margins.get(record["type"], max(self.margins.values(), default=0.0))
        return None if gain >= margin else "long_incoherent"

    def reasons(self, records: Sequence[Record]) -> list[str | None]:
        return [self.reason(r) for r in records]
