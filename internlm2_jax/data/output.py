"""Atomic output of a pipeline run: a staging folder, a folder swap, and ``manifest.json`` written last.

A complete workdir holds ``text/``, ``code/``, ``rejected/`` (shards, laid out by :mod:`.layout`),
``stats.json`` and ``manifest.json`` (every shard with its record count, size and SHA-256, plus the stats).
A run (both runners, through :func:`.pipeline.write_outputs` locally and :mod:`.beam_write` on Beam):

1. removes ``.staging-*`` folders left by killed runs (so never run two pipelines on one workdir at once);
2. writes every shard into ``.staging-<run id>/`` (`.writers.write_shard`: temp name, checksum, rename;
   on Beam each shard by whichever worker holds it) -- a kill or an error here leaves the previous output
   complete and untouched (an error also removes the staging folder);
3. :func:`commit`, from the shards' metadata only (no record, no re-read of a shard): writes
   ``stats.json`` and ``manifest.json`` under temporary names in the staging folder, deletes
   ``manifest.json`` (from now on the output reads as incomplete), swaps each output folder for its staged
   twin (renames; the previous folder moves into the staging folder), renames ``stats.json`` into place
   and, last, ``manifest.json`` -- the commit point (only renames: no disk space needed);
4. deletes the staging folder with the previous run's folders: stale shards (e.g. of another
   ``records_per_shard``) go only after the new manifest is committed.

A kill inside step 3 (a few renames) leaves no manifest, and :func:`verify` refuses the output: run again.
Readers that need complete output call :func:`verify` (``prepare_data`` does at the end of every run).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import pathlib
import shutil
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from internlm2_jax.errors import EXIT_DISK, InputDataError, UserFacingError

from .writers import Shard, file_digest

MANIFEST = "manifest.json"
STATS = "stats.json"
FORMAT = "internlm2_jax.data.manifest/1"
_STAGING_PREFIX = ".staging-"


class OutputDiskFullError(UserFacingError):
    """Disk full (or over quota) while staging a run's output; the previous output is unchanged."""

    exit_code = EXIT_DISK


def _fsync_dir(path: pathlib.Path) -> None:
    """Makes renames inside ``path`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def new_staging(workdir: str | pathlib.Path) -> pathlib.Path:
    """A fresh staging folder inside ``workdir`` (same filesystem: renames are atomic), after removing the
    leftovers of killed runs."""
    work = pathlib.Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    for old in work.glob(_STAGING_PREFIX + "*"):
        shutil.rmtree(old, ignore_errors=True)
    staging = work / f"{_STAGING_PREFIX}{uuid.uuid4().hex[:12]}"
    staging.mkdir()
    return staging


def _write_tmp(path: pathlib.Path, text: str) -> pathlib.Path:
    """``text`` written and flushed under a temporary name next to ``path`` (renamed over it later)."""
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    return tmp


def _prepare(staging: pathlib.Path, shards: Mapping[str, Sequence[Shard]],
             stats: Mapping[str, Any]) -> tuple[pathlib.Path, pathlib.Path, dict[str, Any]]:
    """Writes the manifest (from the shards' metadata: their writers checksummed and flushed them) and
    the stats under temporary names: every byte is on disk before the first rename, so the switch in
    :func:`commit` cannot run out of space."""
    entries = [{"output": name, "path": pathlib.Path(s.path).relative_to(staging).as_posix(),
                "records": s.records, "bytes": s.bytes, "sha256": s.sha256}
               for name, group in shards.items() for s in group]
    manifest = {"format": FORMAT, "run_id": staging.name[len(_STAGING_PREFIX):],
                "created": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                "outputs": {name: sum(s.records for s in group if group and s.path.endswith(
                    pathlib.Path(group[0].path).suffix)) for name, group in shards.items()},  # one format's count
                "shards": entries, "stats": dict(stats)}
    stats_tmp = _write_tmp(staging / STATS, json.dumps(dict(stats), indent=2, ensure_ascii=False))
    manifest_tmp = _write_tmp(staging / MANIFEST, json.dumps(manifest, indent=1, ensure_ascii=False))
    return manifest_tmp, stats_tmp, manifest


def _drop_unlisted(staging: pathlib.Path, shards: Mapping[str, Sequence[Shard]]) -> None:
    """Removes files in the staged output folders that no shard names: temp files of a Beam write attempt
    that was killed and retried (only listed shards may reach the output, :func:`verify` refuses others)."""
    for name, group in shards.items():
        listed = {pathlib.Path(s.path).name for s in group}
        for p in (staging / name).iterdir():
            if p.name not in listed:
                p.unlink()


def commit(workdir: str | pathlib.Path, staging: pathlib.Path, shards: Mapping[str, Sequence[Shard]],
           stats: Mapping[str, Any]) -> dict[str, Any]:
    """Moves the staged output folders (``shards``: output name → shards under ``staging/<name>``) into
    ``workdir`` and writes ``stats.json`` and, last, ``manifest.json``; returns the manifest."""
    work = pathlib.Path(workdir)
    try:
        _drop_unlisted(staging, shards)
        manifest_tmp, stats_tmp, manifest = _prepare(staging, shards, stats)
    except BaseException:  # e.g. disk full: nothing switched yet, the previous output stays complete
        shutil.rmtree(staging, ignore_errors=True)
        raise
    (work / MANIFEST).unlink(missing_ok=True)  # from here until the new manifest: incomplete
    _fsync_dir(work)
    previous = staging / ".previous"
    previous.mkdir()
    for name in shards:
        if (work / name).exists():
            os.replace(work / name, previous / name)
        os.replace(staging / name, work / name)
    os.replace(stats_tmp, work / STATS)
    os.replace(manifest_tmp, work / MANIFEST)  # the commit point
    _fsync_dir(work)
    shutil.rmtree(staging, ignore_errors=True)  # the previous run's folders, stale shards included
    return manifest


def verify(workdir: str | pathlib.Path, *, checksums: bool = True) -> dict[str, Any]:
    """The manifest of complete output in ``workdir``; raises :class:`InputDataError` (one line naming the
    file) when the manifest is missing or unreadable, or a shard is missing, changed, or not listed."""
    work = pathlib.Path(workdir)
    path = work / MANIFEST
    if not path.is_file():
        raise InputDataError(f"{path}: missing: the output in {work} is incomplete (a run was interrupted "
                             "or is in progress); run prepare_data again")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        entries = manifest["shards"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputDataError(f"{path}: unreadable manifest ({e.__class__.__name__}: {e})") from None
    for e in entries:
        p = work / e["path"]
        if not p.is_file():
            raise InputDataError(f"{p}: listed in {path} but missing: output incomplete; run prepare_data again")
        if p.stat().st_size != e["bytes"] or (checksums and file_digest(p) != e["sha256"]):
            raise InputDataError(f"{p}: differs from {path} (size or SHA-256): output changed or incomplete; "
                                 "run prepare_data again")
    listed = {e["path"] for e in entries}
    for name in {e["output"] for e in entries}:
        for p in sorted((work / name).iterdir()):
            if p.relative_to(work).as_posix() not in listed:
                raise InputDataError(f"{p}: not listed in {path}: stale or foreign file in the output")
    return manifest
