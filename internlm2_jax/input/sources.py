"""Random-access text-document sources (JSONL, plain text, ArrayRecord, TFDS) for Grain.

Every source is a Grain `RandomAccessDataSource`: `len(src)` documents, `src[i] -> str | None`.
`None` is only returned for a bad record when the source was opened with `on_error="skip"`
(Grain's `to_iter_dataset` drops `None`); skips are counted in `src.num_skipped` (every skip, every
epoch) and `src.num_bad_records` (distinct records) and logged. With `on_error="raise"` (default) a bad
record raises `BadRecordError` naming file and line. A source whose every record is bad raises
`EmptyDatasetError` once it has seen them all (skipping forever would hang the training loop).

Sources are described by URI strings so a gin config can name them:

    jsonl:/data/web/{split}-*.jsonl      one JSON object per line, text in `text_field`
    text:/data/books/*.txt               plain text; one document per file or per paragraph
    arrayrecord:/data/x/{split}-*.array_record   records are JSON bytes {"text": ...}
    tfds:name[@data_dir]                 `tfds.data_source(name, split=split, data_dir=...)`

`{split}` in a path is replaced by the split name ("train" / "validation").
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import threading
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from internlm2_jax.errors import EmptyDatasetError, InputDataError
from internlm2_jax.jsonl import MissingInputError

log = logging.getLogger(__name__)

OnError = Literal["raise", "skip"]
_PARAGRAPH_SEP = re.compile(rb"\n[ \t\r\f\v]*\n")


class BadRecordError(InputDataError):
    """A record that cannot be decoded; the message names the file and line / record index."""


class _TextSourceBase:
    """Shared bad-record bookkeeping. Subclasses implement `__len__` and `_read(i) -> str`."""

    def __init__(self, on_error: OnError):
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.on_error = on_error
        self.num_skipped = 0
        self.num_bad_records = 0
        self._bad_bits: bytearray | None = None  # one bit per record, allocated at the first skip
        self._lock = threading.Lock()

    def describe(self) -> str:
        """The source as the user named it (its files), for messages."""
        paths = getattr(self, "_paths", [])
        if not paths:
            return type(self).__name__
        return paths[0] + (f" (+{len(paths) - 1} more files)" if len(paths) > 1 else "")

    def _bad(self, where: str, why: str, index: int) -> None:
        """Raise, or count + log a skipped record (never silent); all records bad → `EmptyDatasetError`."""
        msg = f"{where}: {why}"
        if self.on_error == "raise":
            raise BadRecordError(msg)
        with self._lock:
            self.num_skipped += 1
            n = self.num_skipped
            if self._bad_bits is None:
                self._bad_bits = bytearray((len(self) + 7) // 8)
            byte, bit = divmod(index, 8)
            if not self._bad_bits[byte] >> bit & 1:  # distinct records: epochs revisit the same ones
                self._bad_bits[byte] |= 1 << bit
                self.num_bad_records += 1
            all_bad = self.num_bad_records == len(self)
        if all_bad:
            raise EmptyDatasetError(f"{self.describe()}: no usable records ({self.num_bad_records} skipped, "
                                    f"e.g. {msg})")
        if n <= 10 or n & (n - 1) == 0:  # first 10, then at powers of two
            log.warning("skipping bad record #%d: %s", n, msg)

    def __getitem__(self, index: int) -> str | None:
        return self._read(int(index) % len(self))

    def _read(self, index: int) -> str | None:
        raise NotImplementedError

    def __getstate__(self) -> dict[str, Any]:  # picklable for multiprocessing workers
        state = dict(self.__dict__)
        state.pop("_lock", None)
        state.pop("_fds", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
        if "_paths" in state:
            self._fds = {}


def expand_paths(pattern: str | Sequence[str]) -> list[str]:
    """Glob one pattern or a list of patterns/paths (sorted, deterministic); error if none match."""
    patterns = [pattern] if isinstance(pattern, str) else list(pattern)
    out: list[str] = []
    for p in patterns:
        if glob.has_magic(p):
            hits = sorted(glob.glob(p))
            if not hits:
                raise MissingInputError(f"no files match {p!r}")
            out.extend(hits)
        elif not os.path.isfile(p):
            raise MissingInputError(f"input file not found: {p!r}")
        else:
            out.append(p)
    return out


class _SpanFileSource(_TextSourceBase):
    """Documents are byte spans of local files, read with `os.pread` (thread-safe, no seek)."""

    def __init__(self, paths: Sequence[str], on_error: OnError):
        super().__init__(on_error)
        self._paths = list(paths)
        self._fds: dict[int, int] = {}
        file_ids, starts, ends, lines = [], [], [], []
        for fid, path in enumerate(self._paths):
            s, e, ln = self._index_file(path)
            file_ids.append(np.full(len(s), fid, np.int32))
            starts.append(s), ends.append(e), lines.append(ln)
        cat = lambda xs, dt: np.concatenate(xs).astype(dt) if xs else np.zeros(0, dt)
        self._file_ids = cat(file_ids, np.int32)
        self._starts, self._ends = cat(starts, np.int64), cat(ends, np.int64)
        self._lines = cat(lines, np.int64)  # 1-based line number of each span's first line

    def _index_file(self, path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self._starts)

    def _raw(self, index: int) -> tuple[bytes, str]:
        fid = int(self._file_ids[index])
        fd = self._fds.get(fid)
        if fd is None:
            with self._lock:
                fd = self._fds.get(fid)
                if fd is None:
                    fd = self._fds[fid] = os.open(self._paths[fid], os.O_RDONLY)
        start, end = int(self._starts[index]), int(self._ends[index])
        where = f"{self._paths[fid]}:{int(self._lines[index])}"
        return os.pread(fd, end - start, start), where

    def __del__(self, _close=os.close) -> None:  # bound default: works at interpreter exit
        for fd in getattr(self, "_fds", {}).values():
            try:
                _close(fd)
            except OSError:
                pass


_WS = np.zeros(256, bool)
_WS[list(b" \t\r\n\f\v")] = True


def _line_spans(path: str, block: int = 1 << 22) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Byte spans and 1-based line numbers of the non-blank lines of a file, streamed in blocks
    (memory O(block + #lines), not O(file))."""
    starts, ends, lines = [], [], []
    offset, line0, carry = 0, 1, b""  # file offset of `carry`, line number of its first line
    with open(path, "rb") as f:
        while True:
            chunk = f.read(block)
            data = carry + chunk
            if not data:
                break
            arr = np.frombuffer(data, np.uint8)
            nl = np.flatnonzero(arr == ord("\n"))
            if chunk and len(nl) == 0:  # no complete line yet
                carry = data
                continue
            last = len(data) if not chunk else int(nl[-1]) + 1  # complete lines end here
            s = np.concatenate([[0], nl + 1])
            e = np.concatenate([nl, [len(data)]])
            keep_n = len(nl) + (1 if not chunk else 0)  # the final partial line only at EOF
            s, e = s[:keep_n], e[:keep_n]
            nonws = np.concatenate([[0], np.cumsum(~_WS[arr], dtype=np.int64)])
            keep = (nonws[e] - nonws[s]) > 0
            starts.append(s[keep] + offset), ends.append(e[keep] + offset)
            lines.append(np.flatnonzero(keep) + line0)
            offset, line0, carry = offset + last, line0 + len(nl), data[last:]
            if not chunk:
                break
    cat = lambda xs: np.concatenate(xs) if xs else np.zeros(0, np.int64)
    return cat(starts), cat(ends), cat(lines)


class JsonlSource(_SpanFileSource):
    """One document per non-blank JSONL line; the text is `record[text_field]` (a string)."""

    def __init__(self, paths: str | Sequence[str], text_field: str = "text",
                 on_error: OnError = "raise"):
        self.text_field = text_field
        super().__init__(expand_paths(paths), on_error)

    def _index_file(self, path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return _line_spans(path)

    def _read(self, index: int) -> str | None:
        raw, where = self._raw(index)
        try:
            record = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return self._bad(where, f"malformed JSON line ({e})", index)
        if not isinstance(record, dict) or not isinstance(record.get(self.text_field), str):
            return self._bad(where, f"record has no string field {self.text_field!r}", index)
        return record[self.text_field]


class PlainTextSource(_SpanFileSource):
    """Plain UTF-8 text: one document per file (`mode="file"`) or per blank-line-separated
    paragraph (`mode="paragraph"`; whitespace-only paragraphs are dropped)."""

    def __init__(self, paths: str | Sequence[str], mode: Literal["file", "paragraph"] = "file",
                 on_error: OnError = "raise"):
        if mode not in ("file", "paragraph"):
            raise ValueError(f"text mode must be 'file' or 'paragraph', got {mode!r}")
        self.mode = mode
        super().__init__(expand_paths(paths), on_error)

    def _index_file(self, path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        with open(path, "rb") as f:
            data = f.read()
        if self.mode == "file":
            one = np.ones(1 if data.strip() else 0, np.int64)
            return 0 * one, len(data) * one, one
        starts, ends, lines, pos = [], [], [], 0
        for m in list(_PARAGRAPH_SEP.finditer(data)) + [None]:
            end = m.start() if m else len(data)
            if data[pos:end].strip():
                starts.append(pos), ends.append(end), lines.append(data.count(b"\n", 0, pos) + 1)
            pos = m.end() if m else pos
        return np.asarray(starts, np.int64), np.asarray(ends, np.int64), np.asarray(lines, np.int64)

    def _read(self, index: int) -> str | None:
        raw, where = self._raw(index)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            return self._bad(where, f"invalid UTF-8 ({e})", index)


def _decode_record(record: Any, text_field: str) -> str:
    """bytes/str JSON, or a dict (TFDS) with a bytes/str text field -> text."""
    if isinstance(record, (bytes, str)):
        record = json.loads(record)
    if not isinstance(record, dict) or text_field not in record:
        raise KeyError(f"record has no field {text_field!r}")
    text = record[text_field]
    if isinstance(text, np.ndarray):
        text = text.item()
    return text.decode("utf-8") if isinstance(text, bytes) else str(text)


class ArrayRecordSource(_TextSourceBase):
    """ArrayRecord files whose records are JSON bytes `{"text": ...}`."""

    def __init__(self, paths: str | Sequence[str], text_field: str = "text",
                 on_error: OnError = "raise"):
        super().__init__(on_error)
        import grain  # local: keeps `sources` importable for tooling without grain

        self._paths = expand_paths(paths)
        self._fds = {}  # unused; keeps __setstate__ uniform
        self.text_field = text_field
        self._ds = grain.sources.ArrayRecordDataSource(self._paths)
        lengths = [len(grain.sources.ArrayRecordDataSource([p])) for p in self._paths]
        self._offsets = np.cumsum([0] + lengths)

    def __len__(self) -> int:
        return len(self._ds)

    def _read(self, index: int) -> str | None:
        try:
            return _decode_record(self._ds[index], self.text_field)
        except (ValueError, KeyError, UnicodeDecodeError) as e:
            fid = int(np.searchsorted(self._offsets, index, side="right") - 1)
            where = f"{self._paths[fid]}:record {index - int(self._offsets[fid])}"
            return self._bad(where, f"bad record ({e})", index)


class TfdsSource(_TextSourceBase):
    """`tfds.data_source(name, split=split, data_dir=data_dir)` (ArrayRecord-backed, no TF)."""

    def __init__(self, name: str, split: str, data_dir: str | None = None,
                 text_field: str = "text", on_error: OnError = "raise"):
        super().__init__(on_error)
        import tensorflow_datasets as tfds

        self.name, self.split, self.text_field = name, split, text_field
        self._ds = tfds.data_source(name, split=split, data_dir=data_dir)

    def __len__(self) -> int:
        return len(self._ds)

    def _read(self, index: int) -> str | None:
        try:
            return _decode_record(self._ds[index], self.text_field)
        except (ValueError, KeyError, UnicodeDecodeError) as e:
            return self._bad(f"tfds:{self.name}[{self.split}]:record {index}", f"bad record ({e})", index)

    def describe(self) -> str:
        """`tfds:name[split]`."""
        return f"tfds:{self.name}[{self.split}]"


def open_source(uri: str, split: str = "train", *, text_field: str = "text",
                text_mode: Literal["file", "paragraph"] = "file",
                on_error: OnError = "raise") -> _TextSourceBase:
    """Open a source URI (see module docstring) for `split`."""
    kind, sep, rest = uri.partition(":")
    if not sep:
        raise ValueError(f"source URI needs a 'kind:' prefix (jsonl/text/arrayrecord/tfds): {uri!r}")
    rest = rest.replace("{split}", split)
    if kind == "jsonl":
        return JsonlSource(rest, text_field, on_error)
    if kind == "text":
        return PlainTextSource(rest, text_mode, on_error)
    if kind == "arrayrecord":
        return ArrayRecordSource(rest, text_field, on_error)
    if kind == "tfds":
        name, _, data_dir = rest.partition("@")
        if name == "local_text_corpus":
            from internlm2_jax.input import tfds_builder  # registers the builder

            del tfds_builder
        return TfdsSource(name, split, data_dir or None, text_field, on_error)
    raise ValueError(f"unknown source kind {kind!r} in {uri!r}")
