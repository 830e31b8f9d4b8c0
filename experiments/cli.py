"""Shared command line of the experiments: `--gin FILE` (repeatable), `--gin_param`, `--workdir`; logging;
and `run_main`, the one error path (one `error:` line and a documented exit code, `internlm2_jax.errors`)."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import re
import sys
from typing import Callable, Optional, Sequence

from internlm2_jax import errors

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "configs")
NOISY_LOGGERS = ("absl", "jax._src", "orbax", "grain", "etils", "tensorflow", "apache_beam", "urllib3", "httpx")


def setup_logging(level: int = logging.INFO) -> None:
    """INFO lines of this project to stderr (resumes, checkpoint saves); libraries at WARNING.

    Called after the heavy imports: absl/orbax install a root handler on import, so `force=True` replaces it
    (otherwise our INFO lines vanish).
    """
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)  # "exception never retrieved": repeats a raised error
    for handler in logging.getLogger().handlers:
        handler.addFilter(_one_line_for_libraries)


def _one_line_for_libraries(record: logging.LogRecord) -> bool:
    """Library log records become one line without traceback (orbax logs every failed background write with a
    traceback before the error reaches `run_main`, which reports it once)."""
    if not record.name.startswith(("internlm2_jax", "experiments", "__main__")):
        if record.getMessage().startswith("Metadata file does not exist"):
            return False  # orbax, on every restore of a step written without its optional metadata: reads as corruption
        if record.exc_info or record.exc_text:
            record.exc_info, record.exc_text = None, None
        message = record.getMessage()
        if "\n" in message or len(message) > 300:
            record.msg, record.args = message.splitlines()[0][:300] + " ...", None
    return True


def apply_gin(files: Sequence[str], bindings: Sequence[str]) -> None:
    """Parses gin files + bindings and validates numeric bindings; raises `GinConfigError` (one line)."""
    from internlm2_jax.gin_setup import parse_gin, validate_bindings

    parse_gin(files, bindings)
    validate_bindings()


def parse_args(description: str, default_gin: Optional[str] = None,
               argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parses the common flags and applies the gin config (errors reach `run_main` as one line)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--gin", action="append", default=[], help="gin config file (repeatable)")
    p.add_argument("--gin_param", action="append", default=[], help="gin binding, e.g. 'train.num_steps=10'")
    p.add_argument("--workdir", default=None, help="output dir (default runs/<config name>)")
    args = p.parse_args(argv)
    if not args.gin and default_gin:
        args.gin = [os.path.join(CONFIG_DIR, default_gin)]
    if not args.gin:
        p.error("at least one --gin FILE is required")
    if args.workdir is None:  # runs/<config folder>_<config name>, e.g. runs/pretrain_tiny
        folder = os.path.basename(os.path.dirname(os.path.abspath(args.gin[-1])))
        stem = os.path.splitext(os.path.basename(args.gin[-1]))[0]
        args.workdir = os.path.join("runs", stem if folder in ("", "configs") else f"{folder}_{stem}")
    setup_logging()
    apply_gin(args.gin, args.gin_param)
    from internlm2_jax import distributed

    distributed.initialize()  # multi-host (env / SLURM / TPU pod); a no-op for one process
    return args


def say(line: str) -> None:
    """A human summary line (stderr, so stdout stays the JSON summary for scripts)."""
    print(line, file=sys.stderr, flush=True)


def _disk_full(e: BaseException) -> Optional[str]:
    """What was being written when the disk filled up, if `e` (or an exception it wraps: orbax and tensorstore
    re-raise the `OSError` of a background write as their own) is a full disk; else None."""
    seen = 0
    while e is not None and seen < 10:
        if isinstance(e, OSError):
            code, why, name = e.errno, e.strerror, e.filename
            if code is None:  # gin re-raises a proxy whose OSError fields are empty; they survive in its message
                m = re.match(r"\[Errno (\d+)\] (.*?)(?:: '([^'\n]*)')?(?:\n|$)", str(e))
                if m:
                    code, why, name = int(m.group(1)), m.group(2), m.group(3)
            if code in (errno.ENOSPC, errno.EDQUOT):
                return f"{name or 'outputs'} ({why})"
        if "No space left on device" in str(e) or "Disk quota exceeded" in str(e):
            path = re.search(r'(?:Failed writing|local file): "([^"]+)"', str(e))
            return f"{path.group(1) if path else 'outputs'} (No space left on device)"
        e, seen = e.__cause__ or e.__context__, seen + 1
    return None


def run_main(main: Callable[[], Optional[int]]) -> int:
    """Runs an entry point's `main`; maps outcomes to exit codes (`internlm2_jax.errors`):

    a `UserFacingError` → one `error: ...` line and its code; disk full → one line, exit 6; a training loop
    stopped by SIGTERM/SIGINT → "stopped at step N — run the same command to resume", exit 143/130.
    """
    from internlm2_jax.train import outcome

    outcome.reset()
    try:
        code = main() or 0
    except errors.UserFacingError as e:
        say(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}")  # gin appends "In call to ..."
        return e.exit_code
    except Exception as e:  # noqa: BLE001 - only a full disk is turned into one line; the rest re-raised
        full = _disk_full(e)
        if full is None:
            raise
        say(f"error: disk full writing {full}; the previous checkpoint is intact: free space and run the same "
            "command to resume")
        return errors.EXIT_DISK
    last = outcome.last()
    if last is not None:
        say(last.summary())
        if code == 0 and last.status == "stopped":
            return errors.EXIT_SIGINT if last.signal == 2 else errors.EXIT_SIGTERM
    return code


def entry_point(main: Callable[..., Optional[int]]) -> Callable[..., int]:
    """Decorates an entry point's `main(argv=None)` with `run_main` (one error line, exit codes)."""

    def wrapped(argv: Optional[Sequence[str]] = None) -> int:
        return run_main(lambda: main(argv))

    wrapped.__doc__, wrapped.__name__ = main.__doc__, main.__name__
    return wrapped
