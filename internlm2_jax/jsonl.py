"""The one JSONL record reader of the training stages (SFT, preference pairs, PPO prompts).

`read_jsonl_records(paths, parse, on_error)` reads every non-blank line, parses it as JSON and hands it to
`parse` (the stage's validation / normalization). A bad line (invalid UTF-8, bad JSON, or `parse` raising
`ValueError` / `TypeError` / `KeyError` / `AttributeError`) becomes `InputDataError("path:line: what is
wrong")`, or with `on_error="skip"` is counted, logged and left out. No usable record in all the files is an
`EmptyDatasetError` (training on nothing would write an untrained model and exit 0); one empty file among
others is a warning.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Callable, Iterable, Optional, Sequence, Union

from internlm2_jax.errors import ConfigValueError, EmptyDatasetError, InputDataError

log = logging.getLogger(__name__)

ON_ERROR = ("raise", "skip")
PathLike = Union[str, os.PathLike]
_RECORD_ERRORS = (ValueError, TypeError, KeyError, AttributeError)  # what a parse function raises on bad data


class MissingInputError(InputDataError, FileNotFoundError):
    """An input file (or glob) that does not exist: one `error:` line, and still a `FileNotFoundError`."""


class JsonlRecords(list):
    """The parsed records (a plain list to callers) plus what was left out.

    `skipped`: bad lines left out with `on_error="skip"`; `errors`: their `path:line: ...` messages;
    `where`: the `path:line` of each kept record (for errors found later, e.g. at tokenization).
    """

    def __init__(self, records: Iterable[Any] = (), *, skipped: int = 0, errors: Sequence[str] = (),
                 where: Sequence[str] = ()):
        super().__init__(records)
        self.skipped = skipped
        self.errors = list(errors)
        self.where = list(where)


def check_on_error(on_error: str) -> str:
    """`on_error` itself, or a one-line config error."""
    if on_error not in ON_ERROR:
        raise ConfigValueError(f"on_error={on_error!r}: expected 'raise' or 'skip'")
    return on_error


def _record_error(e: BaseException) -> str:
    # str(KeyError('x')) is "'x'", which reads as nothing; say what it is.
    return f"missing field {e}" if type(e) is KeyError else str(e)


def read_jsonl_records(paths: Union[PathLike, Sequence[PathLike]], parse: Optional[Callable[[Any], Any]] = None,
                       on_error: str = "raise", *, what: str = "record",
                       error: type[InputDataError] = InputDataError, allow_empty: bool = False) -> JsonlRecords:
    """Records of one or more JSONL files, each `parse(json.loads(line))` (identity when None).

    Raises `InputDataError("path:line: ...")` on the first bad line (`on_error="raise"`), or skips it,
    counting and logging it (`"skip"`); `MissingInputError` for a missing file; `EmptyDatasetError` when the
    files hold no usable record at all, unless `allow_empty` (the caller has other data; a warning for each
    empty file either way). `what` names a record in messages ("preference pair", "prompt", ...); `error` is
    the class raised for a bad line (a subclass of `InputDataError` that `parse` raises is kept).
    """
    check_on_error(on_error)
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not paths and not allow_empty:
        raise EmptyDatasetError(f"no input files given (no {what}s to read)")
    out = JsonlRecords()
    for path in map(os.fspath, paths):
        if not os.path.isfile(path):
            raise MissingInputError(f"{path}: input file not found")
        kept, skipped = len(out), out.skipped
        with open(path, "rb") as f:  # bytes: a bad byte costs one line, not the whole file
            for lineno, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    try:
                        value = json.loads(raw.decode("utf-8"))
                    except UnicodeDecodeError as e:
                        raise error(f"invalid UTF-8 ({e})") from None
                    except json.JSONDecodeError as e:
                        raise error(f"bad JSON: {e}") from None
                    record = value if parse is None else parse(value)
                except _RECORD_ERRORS as e:
                    msg = f"{where}: {_record_error(e)}"
                    if on_error == "raise":  # keep the reader's own class (e.g. the SFT FormatError)
                        raise (type(e) if isinstance(e, InputDataError) else error)(msg) from None
                    out.skipped += 1
                    out.errors.append(msg)
                    n = out.skipped
                    if n <= 10 or n & (n - 1) == 0:  # first 10, then at powers of two: never silent, never a flood
                        log.warning("skipping bad %s #%d: %s", what, n, msg)
                    continue
                out.append(record)
                out.where.append(where)
        if len(out) == kept:  # one empty file among others (e.g. a round that found nothing to patch): said
            log.warning("%s: no usable %ss (%d skipped)", path, what, out.skipped - skipped)
    if not out and not allow_empty:
        raise EmptyDatasetError(f"{', '.join(map(os.fspath, paths))}: no usable {what}s ({out.skipped} skipped)")
    return out
