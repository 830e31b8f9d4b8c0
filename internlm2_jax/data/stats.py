"""Bad-input accounting and token counting for the stats report (see ``pipeline.summarize``)."""

from __future__ import annotations

from collections import Counter
from typing import Any

from internlm2_jax.data.dedup import shingle_tokens


def approx_tokens(text: str) -> int:
    """Word-character runs plus single CJK characters (a tokenizer-free token count; the same tokens
    as the dedup shingles, `dedup.shingle_tokens`)."""
    return len(shingle_tokens(text))


class BadInput:
    """Counts malformed inputs by kind, with a few examples (file:line) each; and the files decoded with a
    non-UTF-8 encoding (``encodings``, examples under ``decoded_as_<encoding>``).

    Kinds: ``malformed_json``, ``missing_text``, ``empty_file``, ``unreadable_file``, ``unknown_encoding``
    (binary: file skipped), ``undecodable_bytes`` (bytes replaced by U+FFFD; the example names the document
    and its count), ``lone_surrogates`` (replaced by U+FFFD), ``file_too_large``, ``unreadable_record``.
    """

    def __init__(self, max_examples: int = 5, max_kept: int = 1000):
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}
        self.encodings: Counter[str] = Counter()
        self.files_read = 0
        self.max_examples, self.max_kept = max_examples, max_kept

    def add(self, kind: str, where: str, n: int = 1) -> None:
        """Count ``n`` of ``kind`` (e.g. bytes replaced in one document) with one example ``where``."""
        self.counts[kind] += n
        ex = self.examples.setdefault(kind, [])
        if len(ex) < self.max_kept:
            ex.append(where)

    def decoded_as(self, encoding: str, path: str) -> None:
        """Record a file decoded with a non-UTF-8 encoding (reported, never silent)."""
        self.encodings[encoding] += 1
        ex = self.examples.setdefault(f"decoded_as_{encoding}", [])
        if len(ex) < self.max_kept:
            ex.append(path)

    def merge(self, other: dict[str, Any]) -> None:
        """Add another :meth:`to_dict` result (``examples`` may be full lists)."""
        self.files_read += other["files_read"]
        self.counts.update(other["counts"])
        self.encodings.update(other.get("encodings", {}))
        for k, v in other["examples"].items():
            self.examples.setdefault(k, []).extend(v)

    def to_dict(self, full: bool = False) -> dict[str, Any]:
        """Counts plus the first ``max_examples`` examples per kind in sorted order."""
        n = None if full else self.max_examples
        return {"files_read": self.files_read, "counts": dict(sorted(self.counts.items())),
                "encodings": dict(sorted(self.encodings.items())),
                "examples": {k: sorted(v)[:n] for k, v in sorted(self.examples.items())}}
