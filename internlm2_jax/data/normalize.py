"""Source readers that normalize JSONL files, text folders, code repositories and TFDS datasets
into records (see :mod:`internlm2_jax.data.records`).

Bad input never crashes a run and is never dropped silently: malformed JSON lines, missing text
fields and empty files are counted in :class:`~.stats.BadInput` (with ``file:line`` examples) and the
reader moves on; undecodable bytes and lone surrogates are replaced and counted per document
(:mod:`.decoding`, shared by both runners).
"""

from __future__ import annotations

import datetime as dt
import json
import pathlib
from collections.abc import Iterable, Iterator
from typing import Any

from . import decoding
from .records import CODE_EXTENSIONS, Record, make_record
from .stats import BadInput

def _mtime_iso(path: pathlib.Path) -> str:
    ts = dt.datetime.fromtimestamp(path.stat().st_mtime, tz=dt.timezone.utc)
    return ts.strftime("%Y-%m-%dT%H:%M:%SZ")


def _read_file(path: pathlib.Path, bad: BadInput) -> tuple[bytes, str] | None:
    """``(bytes, encoding)`` of a file (:func:`.decoding.choose_encoding`), or None (counted) when it is
    unreadable, empty or binary."""
    bad.files_read += 1
    try:
        data = path.read_bytes()
    except OSError as e:
        bad.add("unreadable_file", f"{path}: {e.__class__.__name__}")
        return None
    if not data.strip():
        bad.add("empty_file", str(path))
        return None
    enc = decoding.choose_encoding(data)
    if enc is None:
        bad.add("unknown_encoding", str(path))
        return None
    if enc not in decoding.UTF8:
        bad.decoded_as(enc, str(path))
    return data, enc


def _decode_whole(path: pathlib.Path, bad: BadInput) -> str | None:
    """One document per file: its text, undecodable bytes replaced and counted (None: skipped, counted)."""
    got = _read_file(path, bad)
    if got is None:
        return None
    text, n = decoding.decode_document(*got)
    if n:
        bad.add("undecodable_bytes", f"{path}: {n} byte(s)", n)
    return text


def read_jsonl(
    paths: Iterable[str | pathlib.Path], source: str, bad: BadInput, *, text_key: str = "text",
    id_key: str = "id", timestamp_keys: tuple[str, ...] = ("timestamp", "date", "crawl_date"),
) -> Iterator[Record]:
    """Records from JSONL files; other JSON fields go to ``meta`` (``url``, ``type``, ...).

    Each line is decoded on its own: undecodable bytes and lone surrogates are replaced by U+FFFD and
    counted per document (``meta['undecodable_bytes']``, ``meta['lone_surrogates']``), never dropped.
    """
    for path in map(pathlib.Path, paths):
        got = _read_file(path, bad)
        if got is None:
            continue
        for lineno, line, n_bytes in decoding.decode_lines(*got):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            if n_bytes:
                bad.add("undecodable_bytes", f"{where}: {n_bytes} byte(s)", n_bytes)
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                bad.add("malformed_json", where)
                continue
            obj, n_surr = decoding.scrub_json(obj)
            if n_surr:
                bad.add("lone_surrogates", f"{where}: {n_surr}", n_surr)
            if not isinstance(obj, dict) or not isinstance(obj.get(text_key), str):
                bad.add("missing_text", where)
                continue
            body = obj.pop(text_key)
            rid = str(obj.pop(id_key, f"{path.name}:{lineno}"))
            ts = next((str(obj.pop(k)) for k in timestamp_keys if obj.get(k) is not None), None)
            lang = obj.pop("lang", None)
            meta: dict[str, Any] = obj
            for key, n in (("undecodable_bytes", n_bytes), ("lone_surrogates", n_surr)):
                if n:
                    meta[key] = n
            yield make_record(f"{source}/{rid}", body, source, lang=lang, timestamp=ts, meta=meta)


def read_text_dir(root: str | pathlib.Path, source: str, bad: BadInput, *,
                  pattern: str = "**/*.txt") -> Iterator[Record]:
    """One record per text file under ``root`` (sorted paths; mtime as timestamp)."""
    root = pathlib.Path(root)
    for path in sorted(root.glob(pattern)):
        if not path.is_file():
            continue
        text = _decode_whole(path, bad)
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
        text = _decode_whole(path, bad)
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
            enc = decoding.choose_encoding(value)
            if enc is None:
                bad.add("unknown_encoding", where)
                continue
            if enc not in decoding.UTF8:
                bad.decoded_as(enc, where)
            value, n = decoding.decode_document(value, enc)
            if n:
                bad.add("undecodable_bytes", f"{where}: {n} byte(s)", n)
        if not isinstance(value, str):
            bad.add("missing_text", where)
            continue
        meta = {k: (v.decode("utf-8", "replace") if isinstance(v, bytes) else v)
                for k, v in ex.items() if k != text_key and isinstance(v, (str, bytes, int, float))}
        (value, meta), n_surr = decoding.scrub_json([value, meta])
        if n_surr:
            bad.add("lone_surrogates", f"{where}: {n_surr}", n_surr)
        yield make_record(f"{source}/{split}/{i}", value, source, meta=meta)
