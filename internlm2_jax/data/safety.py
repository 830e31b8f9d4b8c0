"""Safety filter: URL domain blocklist, word lists and a pluggable classifier.

A record is dropped with reason ``blocked_domain`` (``meta['url']`` host or any parent domain in
the blocklist), ``blocked_words`` (at least ``min_word_hits`` distinct listed words/phrases;
CJK entries match as substrings, others as whole words) or ``unsafe_classifier`` (classifier
score >= threshold). :class:`HashedNgramLogReg` is a small trainable classifier (hashed character
n-grams + logistic regression in numpy) usable as the classifier.
"""

from __future__ import annotations

import re
import urllib.parse
import zlib
from collections.abc import Iterable, Sequence
from typing import Protocol, runtime_checkable

import numpy as np

from .records import Record


@runtime_checkable
class TextClassifier(Protocol):
    """Anything that scores texts with a probability-like number (higher = more unsafe/better)."""

    def score(self, texts: Sequence[str]) -> np.ndarray: ...


def url_host(url: str) -> str:
    """Lower-cased host of ``url`` ('' when unparsable)."""
    try:
        return (urllib.parse.urlsplit(url if "//" in url else "//" + url).hostname or "").lower()
    except ValueError:
        return ""


class SafetyFilter:
    """Domain blocklist + word list + optional classifier."""

    def __init__(self, blocked_domains: Iterable[str] = (), blocked_words: Iterable[str] = (), *,
                 min_word_hits: int = 2, classifier: TextClassifier | None = None,
                 classifier_threshold: float = 0.5):
        self.domains = {d.lower().lstrip(".") for d in blocked_domains}
        words = [w.lower() for w in blocked_words if w.strip()]
        cjk = [w for w in words if re.search(r"[\u3400-\u9fff]", w)]
        latin = [w for w in words if w not in cjk]
        parts = [re.escape(w) for w in cjk] + [rf"\b{re.escape(w)}\b" for w in latin]
        self.word_re = re.compile("|".join(parts)) if parts else None
        self.min_word_hits = min_word_hits
        self.classifier = classifier
        self.threshold = classifier_threshold

    def domain_blocked(self, url: str) -> bool:
        host = url_host(url)
        labels = host.split(".")
        return any(".".join(labels[i:]) in self.domains for i in range(len(labels)))

    def word_hits(self, text: str) -> int:
        return len(set(self.word_re.findall(text.lower()))) if self.word_re else 0

    def reasons(self, records: Sequence[Record]) -> list[str | None]:
        """Drop reason per record (None = keep); the classifier runs once on the survivors."""
        out: list[str | None] = []
        for r in records:
            url = r.get("meta", {}).get("url")
            if url and self.domain_blocked(str(url)):
                out.append("blocked_domain")
            elif self.word_hits(r["text"]) >= self.min_word_hits:
                out.append("blocked_words")
            else:
                out.append(None)
        if self.classifier is not None:
            idx = [i for i, x in enumerate(out) if x is None]
            if idx:
                scores = np.asarray(self.classifier.score([records[i]["text"] for i in idx]))
                for i, s in zip(idx, scores):
                    if s >= self.threshold:
                        out[i] = "unsafe_classifier"
        return out


class HashedNgramLogReg:
    """Logistic regression over hashed character n-gram counts (log-scaled, L2-normalized)."""

    def __init__(self, n_features: int = 1 << 16, ngram_range: tuple[int, int] = (1, 3),
                 l2: float = 1e-4, seed: int = 0):
        self.n_features = n_features
        self.ngram_range = ngram_range
        self.l2 = l2
        self.w = np.zeros(n_features, dtype=np.float64)
        self.b = 0.0
        self.seed = seed

    def features(self, texts: Sequence[str]) -> np.ndarray:
        """Dense ``[n, n_features]`` features (fine for the small batches we score)."""
        x = np.zeros((len(texts), self.n_features), dtype=np.float32)
        lo, hi = self.ngram_range
        for i, t in enumerate(texts):
            t = t.lower()
            idx = [zlib.crc32(t[j : j + n].encode("utf-8")) % self.n_features
                   for n in range(lo, hi + 1) for j in range(len(t) - n + 1)]
            if idx:
                np.add.at(x[i], np.asarray(idx), 1.0)
            row = np.log1p(x[i])
            x[i] = row / max(np.linalg.norm(row), 1e-6)
        return x

    def fit(self, texts: Sequence[str], labels: Sequence[int], *, epochs: int = 200,
            lr: float = 1.0) -> HashedNgramLogReg:
        """Full-batch gradient descent on the L2-regularized logistic loss."""
        x = self.features(texts)
        y = np.asarray(labels, dtype=np.float64)
        for _ in range(epochs):
            p = 1 / (1 + np.exp(-(x @ self.w + self.b)))
            g = p - y
            self.w -= lr * (x.T @ g / len(y) + self.l2 * self.w)
            self.b -= lr * g.mean()
        return self

    def score(self, texts: Sequence[str]) -> np.ndarray:
        """Probability of the positive (unsafe) class per text."""
        if not texts:
            return np.zeros(0)
        return 1 / (1 + np.exp(-(self.features(texts) @ self.w + self.b)))

    def save(self, path: str) -> None:
        np.savez(path, w=self.w, b=self.b, n_features=self.n_features, ngram_range=self.ngram_range)

    @classmethod
    def load(cls, path: str) -> HashedNgramLogReg:
        z = np.load(path)
        m = cls(int(z["n_features"]), tuple(int(v) for v in z["ngram_range"]))
        m.w, m.b = z["w"], float(z["b"])
        return m
