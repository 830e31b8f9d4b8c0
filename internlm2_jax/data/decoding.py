"""Bytes → text for every reader of the data pipeline (local and Beam runners share it).

Rules (issue 16: nothing lost, nothing silently wrong):

* the **encoding is chosen per file**: a BOM wins; then UTF-8, which also wins for a file that is *mostly*
  UTF-8 (at most half of its non-ASCII bytes undecodable); a fallback encoding (GB18030) only when the whole
  file decodes under it and UTF-8 does not -- so a few stray GB18030 bytes in an English UTF-8 file never
  turn its "café" into "caf茅";
* the **text is decoded per document** (a JSONL line, a text file): undecodable bytes become U+FFFD, one per
  byte, and are counted for that document -- a bad byte never drops a file or a document;
* only a file where no encoding fits and more than a quarter of the bytes are undecodable (binary) is
  refused (``None``);
* lone surrogates (JSON ``"\\ud800"`` escapes) cannot be written as UTF-8: :func:`scrub_json` replaces and
  counts them.
"""

from __future__ import annotations

import codecs
import re
import threading
from collections.abc import Iterator
from typing import Any

FALLBACK_ENCODINGS = ("gb18030",)
"""Tried, strictly and for a whole file, when UTF-8 does not fit it."""
UTF8 = ("utf-8", "utf-8-sig")
BINARY_FRACTION = 0.25
"""A file with no fitting encoding and more undecodable bytes than this fraction is not text."""

_BOMS = ((b"\xef\xbb\xbf", "utf-8-sig"), (b"\xff\xfe\x00\x00", "utf-32"), (b"\x00\x00\xfe\xff", "utf-32"),
         (b"\xff\xfe", "utf-16"), (b"\xfe\xff", "utf-16"))
_SURROGATE_RE = re.compile("[\ud800-\udfff]")
_NON_ASCII = bytes(range(128, 256))
_HANDLER = "internlm2_jax.count_replace"
_count = threading.local()  # the handler's counter; Beam may decode on several threads


def _count_replace(err: UnicodeError) -> tuple[str, int]:
    """Codec error handler: one U+FFFD per undecodable byte, counted in ``_count.n``."""
    if not isinstance(err, UnicodeDecodeError):
        raise err
    n = err.end - err.start
    _count.n = getattr(_count, "n", 0) + n
    return "\ufffd" * n, err.end


codecs.register_error(_HANDLER, _count_replace)


def decode_document(data: bytes, encoding: str) -> tuple[str, int]:
    """``(text, undecodable bytes replaced by U+FFFD)`` of one document's bytes."""
    _count.n = 0
    text = data.decode(encoding, _HANDLER)
    return text, _count.n


def _undecodable_utf8(data: bytes) -> int:
    return decode_document(data, "utf-8")[1]


def choose_encoding(data: bytes) -> str | None:
    """The encoding of a whole file (see the module docstring); ``None`` when it is not text."""
    for bom, enc in _BOMS:
        if data.startswith(bom):
            return None if decode_document(data, enc)[1] > BINARY_FRACTION * len(data) else enc
    bad = _undecodable_utf8(data)
    if bad == 0:
        return "utf-8"
    non_ascii = len(data) - len(data.translate(None, _NON_ASCII))
    if 2 * bad <= non_ascii:  # mostly well-formed UTF-8: a few bad bytes, replaced and counted
        return "utf-8"
    for enc in FALLBACK_ENCODINGS:
        try:
            text = data.decode(enc)
        except UnicodeDecodeError:
            continue
        if "\x00" not in text:  # NULs: binary that happens to decode
            return enc
    return None if bad > BINARY_FRACTION * len(data) else "utf-8"


def decode_lines(data: bytes, encoding: str) -> Iterator[tuple[int, str, int]]:
    """``(line number, text, bytes replaced)`` per line, each line decoded on its own (so the count belongs to
    one document); UTF-16/32 files are decoded whole first (their newlines are not the byte ``\\n``)."""
    if encoding == "utf-8-sig":
        data, encoding = data[3:], "utf-8"
    if encoding in ("utf-16", "utf-32"):
        text, n = decode_document(data, encoding)
        for i, line in enumerate(text.split("\n"), 1):
            yield i, line.rstrip("\r"), n if i == 1 else 0  # position of the bad bytes unknown: on line 1
        return
    for i, raw in enumerate(data.split(b"\n"), 1):
        text, n = decode_document(raw.rstrip(b"\r"), encoding)
        yield i, text, n


def scrub_text(s: str) -> tuple[str, int]:
    """``s`` with lone surrogates replaced by U+FFFD, and how many (they cannot be encoded as UTF-8)."""
    return _SURROGATE_RE.subn("\ufffd", s)


def scrub_json(obj: Any) -> tuple[Any, int]:
    """A parsed JSON value with lone surrogates replaced in every string (keys too), and how many."""
    if isinstance(obj, str):
        return scrub_text(obj)
    if isinstance(obj, list):
        pairs = [scrub_json(v) for v in obj]
        return [v for v, _ in pairs], sum(n for _, n in pairs)
    if isinstance(obj, dict):
        out, total = {}, 0
        for k, v in obj.items():
            k2, n1 = scrub_text(k)
            v2, n2 = scrub_json(v)
            out[k2], total = v2, total + n1 + n2
        return out, total
    return obj, 0
