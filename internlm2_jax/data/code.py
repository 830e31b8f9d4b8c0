"""Code pipeline: markdown formatting, indent-insensitive file dedup and quality tiers.

* Format: every file becomes ``"```{language}\\n{comment} {path}\\n{body}\\n```\\n"``.
* Dedup: files are equal when their token streams (``\\w+`` runs and single punctuation
  characters, i.e. ignoring all whitespace and indentation) are equal; the first occurrence in
  input order is kept (reason ``code_duplicate`` for the rest).
* Tiers: a pluggable scorer (``score(texts) -> [0, 1]``, default :class:`HeuristicCodeScorer`);
  ``high`` (>= ``high``, default 0.8) files are repeated ``high_repeats`` times in the output, ``medium`` once,
  ``low`` (< ``low``) are dropped (reason ``code_low_quality``).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence

import numpy as np

from .records import Record
from .safety import TextClassifier

_TOKEN_RE = re.compile(r"\w+|[^\w\s]")
_HASH_COMMENT = {"python", "bash", "ruby", "julia", "r", "perl"}
_SQL_COMMENT = {"sql", "lua"}
_DEF_RE = re.compile(r"^\s*(def |class |function\b|fn |func |public |private |static |int |void )", re.M)
_COMMENT_RE = re.compile(r"^\s*(#|//|/\*|\*|--|\"\"\"|''')")


def comment_prefix(language: str) -> str:
    return "#" if language in _HASH_COMMENT else "--" if language in _SQL_COMMENT else "//"


def to_markdown(record: Record) -> str:
    """The file as one fenced markdown block with its path as a first-line comment."""
    meta = record.get("meta", {})
    lang = meta.get("language", "")
    body = record["text"].rstrip("\n")
    return f"```{lang}\n{comment_prefix(lang)} {meta.get('path', record['id'])}\n{body}\n```\n"


def dedup_key(text: str) -> str:
    """Whitespace/indentation-insensitive content hash."""
    return hashlib.blake2b(" ".join(_TOKEN_RE.findall(text)).encode("utf-8"), digest_size=16).hexdigest()


def dedup_reasons(records: Sequence[Record], seen: set[str] | None = None) -> list[str | None]:
    """``code_duplicate`` for every file whose :func:`dedup_key` was seen before (``seen`` updated)."""
    seen = set() if seen is None else seen
    out: list[str | None] = []
    for r in records:
        k = dedup_key(r["text"])
        out.append("code_duplicate" if k in seen else None)
        seen.add(k)
    return out


class HeuristicCodeScorer:
    """Score in [0, 1]: starts at 1 and loses points for long lines, few definitions/comments,
    very short or huge files, low alphanumeric share and large literal blobs."""

    def score(self, texts: Sequence[str]) -> np.ndarray:
        return np.array([self._one(t) for t in texts])

    @staticmethod
    def _one(text: str) -> float:
        lines = [ln for ln in text.splitlines() if ln.strip()]
        if not lines:
            return 0.0
        s = 1.0
        mean_len = sum(len(ln) for ln in lines) / len(lines)
        if mean_len > 80:
            s -= 0.3
        if max(len(ln) for ln in lines) > 300:
            s -= 0.2
        if len(lines) < 5:
            s -= 0.3
        if len(lines) > 5000:
            s -= 0.2
        if not _DEF_RE.search(text):
            s -= 0.2
        if sum(1 for ln in lines if _COMMENT_RE.match(ln)) / len(lines) < 0.02:
            s -= 0.1
        alnum = sum(c.isalnum() for c in text) / len(text)
        if alnum < 0.45:
            s -= 0.3
        digits = sum(c.isdigit() for c in text) / len(text)
        if digits > 0.25:  # data tables / hex blobs
            s -= 0.4
        return float(min(1.0, max(0.0, s)))


def tier(score: float, high: float = 0.8, low: float = 0.4) -> str:
    """``high`` / ``medium`` / ``low`` from a quality score."""
    return "high" if score >= high else "medium" if score >= low else "low"


def assign_tiers(records: Sequence[Record], scorer: TextClassifier | None = None, *,
                 high: float = 0.8, low: float = 0.4, high_repeats: int = 2) -> list[str | None]:
    """Set ``meta['tier']``/``meta['repeats']``/``meta['quality']``; reason ``code_low_quality``
    for the low tier."""
    scorer = scorer or HeuristicCodeScorer()
    scores = scorer.score([r["text"] for r in records]) if records else []
    reasons: list[str | None] = []
    for r, s in zip(records, scores):
        t = tier(float(s), high, low)
        r.setdefault("meta", {}).update(
            tier=t, quality=round(float(s), 4), repeats={"high": high_repeats, "medium": 1, "low": 0}[t])
        reasons.append("code_low_quality" if t == "low" else None)
    return reasons
