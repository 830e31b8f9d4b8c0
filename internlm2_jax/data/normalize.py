"""Source readers that normalize JSONL files, text folders, code repositories and TFDS datasets
into records (see :mod:`internlm2_jax.data.records`).

Bad input never crashes a run and is never dropped silently: malformed JSON lines, undecodable
bytes, missing text fields and empty files are counted in :class:`~.stats.BadInput` (with
``file:line`` examples) and the reader moves on.
"""

from __future__ import annotations

import datetime as dt
import json
import pathlib
from collections.abc import Iterable, Iterator
from typing import Any

from .records import CODE_EXTENSIONS, Record, make_record
from .stats import BadInput

# Tried in order after UTF-8 (with BOM sniffing for UTF-16/32).
FALLBACK_ENCODINGS = ("gb18030",)
_BOMS = ((b"\xef\xbb\xbf", "utf-8-sig"), (b"\xff\xfe\x00\x00", "utf-32"), (b"\x00\x00\xfe\xff", "utf-32"),
         (b"\xff\xfe", "utf-16"), (b"\xfe\xff", "utf-16"))


def decode_bytes(data: bytes) -> tuple[str | None, str]:
    """Decode with BOM sniffing, UTF-8, then :data:`FALLBACK_ENCODINGS`; ``(None, '')`` if none fits."""
    for bom, enc in _BOMS:
        if data.startswith(bom):
            try:
                return data.decode(enc), enc
            except UnicodeDecodeError:
                return None, ""
    for enc in ("utf-8", *FALLBACK_ENCODINGS):
        try:
            text = data.decode(enc)
        except UnicodeDecodeError:
            continue
        if enc != "utf-8" and "\x00" in text:
            continue
        return text, enc
    return None, ""


def _mtime_iso(path: pathlib.Path) -> str:
    ts = dt.datetime.fromtimestamp(path.stat().st_mtime, tz=dt.timezone.utc)
    return ts.strftime("%Y-%m-%dT%H:%M:%SZ")


def _read_file(path: pathlib.Path, bad: BadInput) -> str | None:
    bad.files_read += 1
    try:
        data = path.read_bytes()
    except OSError as e:
        bad.add("unreadable_file", f"{path}: {e.__class__.__name__}")
        return None
    if not data.strip():
        bad.add("empty_file", str(path))
        return None
    text, _ = decode_bytes(data)
    if text is None:
        bad.add("unknown_encoding", str(path))
    return text


def read_jsonl(
    paths: Iterable[str | pathlib.Path], source: str, bad: BadInput, *, text_key: str = "text",
    id_key: str = "id", timestamp_keys: tuple[str, ...] = ("timestamp", "date", "crawl_date"),
) -> Iterator[Record]:
    """Records from JSONL files; other JSON fields go to ``meta`` (``url``, ``type``, ...)."""
    for path in map(pathlib.Path, paths):
        text = _read_file(path, bad)
        if text is None:
            continue
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                bad.add("malformed_json", where)
                continue
            if not isinstance(obj, dict) or not isinstance(obj.get(text_key), str):
                bad.add("missing_text", where)
                continue
            body = obj.pop(text_key)
            rid = str(obj.pop(id_key, f"{path.name}:{lineno}"))
            ts = next((str(obj.pop(k)) for k in timestamp_keys if obj.get(k) is not None), None)
            lang = obj.pop("lang", None)
            meta: dict[str, Any] = obj
            yield make_record(f"{source}/{rid}", body, source, lang=lang, timestamp=ts, meta=meta)


def read_text_dir(root: str | pathlib.Path, source: str, bad: BadInput, *,
                  pattern: str = "**/*.txt") -> Iterator[Record]:
    """One record per text file under ``root`` (sorted paths; mtime as timestamp)."""
    root = pathlib.Path(root)
    for path in sorted(root.glob(pattern)):
        if not path.is_file():
            continue
        text = _read_file(path, bad)
        if text is None:
            continue
        rel = path.relative_to(root).as_posix()
        yield make_record(f"{source}/{rel}", text, source, timestamp=_mtime_iso(path),
                          meta={"path": rel})


def read_code_repo(root: str | pathlib.Path, source: str, bad: BadInput, *,
                   repo: str | None = None, include: Iterable[str] = (), extensions: Iterable[str] = tuple(CODE_EXTENSIONS),
                   max_bytes: int = 1 << 20, exclude_dirs: Iterable[str] = (".git", "__pycache__",
                   "node_modules", "site-packages")) -> Iterator[Record]:
    """One ``code`` record per source file of a repository (``meta``: repo, path, language).

    ``include``: only files under these relative sub-folders (all when empty).
    """
    root = pathlib.Path(root)
    repo = repo or root.name
    exts = set(extensions)
    skip = set(exclude_dirs)
    bases = [root / i for i in include] or [root]
    for path in sorted(p for b in bases for p in b.rglob("*")):
        if path.suffix not in exts or not path.is_file() or skip & set(path.relative_to(root).parts):
            continue
        if path.stat().st_size > max_bytes:
            bad.add("file_too_large", str(path))
            continue
        text = _read_file(path, bad)
        if text is None:
            continue
        rel = path.relative_to(root).as_posix()
        yield make_record(f"{source}/{repo}/{rel}", text, source, lang="code", type="code",
                          timestamp=_mtime_iso(path),
                          meta={"repo": repo, "path": rel, "language": CODE_EXTENSIONS[path.suffix]})


def read_tfds(name: str, source: str, bad: BadInput, *, split: str = "train", text_key: str = "text",
              data_dir: str | None = None, limit: int | None = None) -> Iterator[Record]:
    """Records from a prepared TFDS dataset via ``tfds.data_source`` (random access, no TensorFlow)."""
    import tensorflow_datasets as tfds

    ds = tfds.data_source(name, split=split, data_dir=data_dir)
    n = len(ds) if limit is None else min(limit, len(ds))
    for i in range(n):
        where = f"tfds:{name}/{split}[{i}]"
        try:
            ex = ds[i]
        except Exception as e:  # a corrupt record must not end the shard
            bad.add("unreadable_record", f"{where}: {e.__class__.__name__}")
            continue
        value = ex.get(text_key) if isinstance(ex, dict) else None
        if isinstance(value, bytes):
            value, _ = decode_bytes(value)
            if value is None:
                bad.add("unknown_encoding", where)
                continue
        if not isinstance(value, str):
            bad.add("missing_text", where)
            continue
        meta = {k: (v.decode("utf-8", "replace") if isinstance(v, bytes) else v)
                for k, v in ex.items() if k != text_key and isinstance(v, (str, bytes, int, float))}
        yield make_record(f"{source}/{split}/{i}", value, source, meta=meta)
