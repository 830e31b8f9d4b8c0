"""The normalized record format and heuristic language/type classification.

A record is a plain JSON-serializable dict::

    {"id": str, "text": str, "source": str, "lang": "zh"|"en"|"code"|"other",
     "type": "web"|"book"|"code"|"techlit", "timestamp": str (ISO-8601) | None, "meta": dict}
"""

from __future__ import annotations

import json
import re
from typing import Any

Record = dict[str, Any]
LANGS = ("zh", "en", "code", "other")
TYPES = ("web", "book", "code", "techlit")

_CJK_RE = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]")
_LATIN_RE = re.compile(r"[A-Za-z]")
_WORD_RE = re.compile(r"[A-Za-z]+")
_CODE_LINE_RE = re.compile(
    r"^\s*(def |class |import |from \S+ import|#include|return\b|if\s*\(|for\s*\(|while\s*\(|"
    r"function\b|const |let |var |public |private |package |fn |#!|//|/\*|\}|\{)|[;{}]\s*$"
)
_EN_STOP = frozenset(
    "the of and to in a is that for it as was with be by on not he this are or his from at which "
    "but have an they you were her she there been one all we their has would when if can more".split()
)
_TECHLIT_RE = re.compile(
    r"\\begin\{|\\cite\{|\\section\{|\barXiv\b|\bdoi:|\bet al\.|^\s*(abstract|references)\s*$|"
    r"摘要|参考文献|关键词", re.IGNORECASE | re.MULTILINE)
_BOOK_RE = re.compile(r"^\s*(chapter\s+\w+|第[一二三四五六七八九十百零\d]+[章回节])", re.IGNORECASE | re.MULTILINE)
CODE_EXTENSIONS = {
    ".py": "python", ".js": "javascript", ".ts": "typescript", ".c": "c", ".h": "c", ".cc": "cpp",
    ".cpp": "cpp", ".hpp": "cpp", ".java": "java", ".go": "go", ".rs": "rust", ".sh": "bash",
    ".rb": "ruby", ".php": "php", ".cs": "csharp", ".swift": "swift", ".kt": "kotlin",
    ".scala": "scala", ".lua": "lua", ".jl": "julia", ".m": "objectivec", ".sql": "sql",
}


def make_record(
    id: str, text: str, source: str, *, lang: str | None = None, type: str | None = None,
    timestamp: str | None = None, meta: dict[str, Any] | None = None,
) -> Record:
    """Build a record, classifying ``lang``/``type`` heuristically when not given."""
    meta = dict(meta or {})
    lang = lang or detect_lang(text, path=meta.get("path"))
    type = type or classify_type(text, lang=lang, meta=meta)
    if lang not in LANGS:
        raise ValueError(f"record {id!r}: unknown lang {lang!r}; expected one of {LANGS}")
    if type not in TYPES:
        raise ValueError(f"record {id!r}: unknown type {type!r}; expected one of {TYPES}")
    return {"id": id, "text": text, "source": source, "lang": lang, "type": type,
            "timestamp": timestamp, "meta": meta}


def script_stats(text: str) -> dict[str, float]:
    """Fractions of CJK and Latin letters among non-space characters, and of code-like lines."""
    sample = text[:20000]
    nonspace = max(1, sum(1 for c in sample if not c.isspace()))
    lines = [ln for ln in sample.splitlines() if ln.strip()]
    code_lines = sum(1 for ln in lines if _CODE_LINE_RE.search(ln))
    return {
        "cjk": len(_CJK_RE.findall(sample)) / nonspace,
        "latin": len(_LATIN_RE.findall(sample)) / nonspace,
        "code_lines": code_lines / max(1, len(lines)),
    }


def detect_lang(text: str, path: str | None = None) -> str:
    """``zh`` (CJK >= 30 % of non-space chars), ``code`` (known source extension or >= 40 % code-like
    lines), ``en`` (Latin letters with >= 5 % English stopwords), else ``other``."""
    if path and any(str(path).endswith(ext) for ext in CODE_EXTENSIONS):
        return "code"
    st = script_stats(text)
    if st["cjk"] >= 0.3:
        return "zh"
    if st["code_lines"] >= 0.4:
        return "code"
    if st["latin"] >= 0.5:
        words = [w.lower() for w in _WORD_RE.findall(text[:20000])]
        if words and sum(w in _EN_STOP for w in words) / len(words) >= 0.05:
            return "en"
    return "other"


def classify_type(text: str, *, lang: str, meta: dict[str, Any] | None = None) -> str:
    """``meta['type']`` when given; ``code`` for code; ``techlit`` for papers (LaTeX, arXiv, DOI,
    abstract/references); ``book`` for long texts (>= 100k chars) or chapter headings; else ``web``."""
    meta = meta or {}
    if meta.get("type") in TYPES:
        return meta["type"]
    if lang == "code":
        return "code"
    if len(_TECHLIT_RE.findall(text[:50000])) >= 2:
        return "techlit"
    if len(text) >= 100_000 or len(_BOOK_RE.findall(text[:50000])) >= 2:
        return "book"
    return "web"


def to_json_bytes(record: Record) -> bytes:
    """Canonical JSON encoding (sorted keys, UTF-8) used for every output shard.

    The readers replace lone surrogates (:func:`.decoding.scrub_json`); one that still gets here is a bug of
    the code that built the record, named here rather than as a bare codec error.
    """
    try:
        return json.dumps(record, ensure_ascii=False, sort_keys=True).encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"record {record.get('id')!r}: {e.reason} (a lone surrogate?): cannot be written "
                         "as UTF-8; build records through the readers of internlm2_jax.data.normalize") from e
