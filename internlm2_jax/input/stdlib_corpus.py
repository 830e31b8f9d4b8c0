"""An embedded pretraining corpus needing no download: the Python standard library's `.py` files.

`build_stdlib_corpus(cache_dir)` writes, once per (Python version, stdlib path, parameters):

    <cache_dir>/stdlib-py3.11-<key>/
        train-00000-of-00004.jsonl ... train-00003-of-00004.jsonl   {"text": source, "path": rel}
        validation-00000-of-00001.jsonl
        manifest.json                                               counts, bytes, parameters

Documents are whole source files (code plus docstrings/comments) in sorted relative-path order,
skipping test directories, `test_*.py`, site-/dist-packages and non-UTF-8 files, until `max_bytes`
is reached. A file is in the validation split iff sha256(relative path) mod 10_000 falls under
`val_fraction` (stable across machines). `ensure_tokenizer` trains a sentencepiece tokenizer on
the train split once and caches it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import pathlib
import shutil
import sys
import sysconfig
import tempfile
from collections.abc import Iterator

log = logging.getLogger(__name__)

SKIP_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages",
                       "__pycache__"})
CACHE_ENV = "INTERNLM2_JAX_CACHE"


def default_cache_dir() -> str:
    """`$INTERNLM2_JAX_CACHE`, else `$XDG_CACHE_HOME/internlm2_jax`, else `~/.cache/internlm2_jax`."""
    if os.environ.get(CACHE_ENV):
        return os.environ[CACHE_ENV]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "internlm2_jax")


def _announce(what: str) -> None:
    """One line on stderr when a cached artifact is built for the first time (it takes a while)."""
    print(f"internlm2_jax: {what} (once; cached)", file=sys.stderr, flush=True)


def stdlib_files(stdlib_dir: str | None = None) -> Iterator[tuple[str, pathlib.Path]]:
    """(relative path, path) of the stdlib `.py` files to use, in sorted order."""
    root = pathlib.Path(stdlib_dir or sysconfig.get_paths()["stdlib"])
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("."))
        for name in sorted(filenames):
            if name.endswith(".py") and not name.startswith("test_"):
                path = pathlib.Path(dirpath) / name
                yield path.relative_to(root).as_posix(), path


def is_validation(rel_path: str, val_fraction: float) -> bool:
    """Deterministic held-out assignment by hash of the relative path."""
    h = int.from_bytes(hashlib.sha256(rel_path.encode()).digest()[:8], "little")
    return h % 10_000 < round(val_fraction * 10_000)


def _key(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]


def build_stdlib_corpus(cache_dir: str | os.PathLike | None = None, *,
                        max_bytes: int = 20_000_000, val_fraction: float = 0.02,
                        num_shards: int = 4, stdlib_dir: str | None = None) -> pathlib.Path:
    """Build (or reuse) the corpus; returns its directory (see module docstring for layout)."""
    root = pathlib.Path(stdlib_dir or sysconfig.get_paths()["stdlib"])
    version = f"py{sys.version_info.major}.{sys.version_info.minor}"
    key = _key(version, str(root), max_bytes, val_fraction, num_shards, 1)
    out = pathlib.Path(cache_dir or default_cache_dir()) / f"stdlib-{version}-{key}"
    if (out / "manifest.json").exists():
        return out
    _announce(f"building the Python-stdlib pretraining corpus in {out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=out.name + ".tmp", dir=out.parent))
    names = [f"train-{i:05d}-of-{num_shards:05d}.jsonl" for i in range(num_shards)]
    counts = {"train": 0, "validation": 0, "skipped_non_utf8": 0}
    total = 0
    with contextlib.ExitStack() as stack:
        files = [stack.enter_context(open(tmp / n, "w", encoding="utf-8")) for n in names]
        val = stack.enter_context(
            open(tmp / "validation-00000-of-00001.jsonl", "w", encoding="utf-8"))
        for rel, path in stdlib_files(str(root)):
            if total >= max_bytes:
                break
            try:
                text = path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                counts["skipped_non_utf8"] += 1
                continue
            if not text.strip():
                continue
            line = json.dumps({"text": text, "path": rel}, ensure_ascii=False) + "\n"
            if is_validation(rel, val_fraction):
                val.write(line)
                counts["validation"] += 1
            else:
                files[counts["train"] % num_shards].write(line)
                counts["train"] += 1
            total += len(text.encode("utf-8"))
    manifest = {"stdlib": str(root), "python": version, "max_bytes": max_bytes,
                "val_fraction": val_fraction, "num_shards": num_shards, "bytes": total, **counts}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    try:
        os.rename(tmp, out)  # atomic; a concurrent builder may have won the race
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("stdlib corpus at %s: %s", out, manifest)
    return out


def corpus_texts(corpus_dir: str | os.PathLike, split: str = "train",
                 max_bytes: int | None = None) -> Iterator[str]:
    """Texts of a JSONL corpus split, shards in order, stopping after `max_bytes` of text."""
    total = 0
    for shard in sorted(pathlib.Path(corpus_dir).glob(f"{split}-*.jsonl")):
        with open(shard, encoding="utf-8") as f:
            for line in f:
                text = json.loads(line)["text"]
                yield text
                total += len(text.encode("utf-8"))
                if max_bytes is not None and total >= max_bytes:
                    return


def ensure_tokenizer(corpus_dir: str | os.PathLike, vocab_size: int = 4096,
                     cache_dir: str | os.PathLike | None = None, *,
                     sample_bytes: int = 4_000_000) -> str:
    """Train (once) a sentencepiece tokenizer on <= `sample_bytes` of the corpus train split.

    Cached under `cache_dir` keyed on the corpus manifest, vocab size and sample size; uses
    `internlm2_jax.data.tokenizer_training.train_tokenizer` (InternLM2 settings, chat specials at
    the top of the vocab). Returns the `.model` path, loadable by `internlm2_jax.tokenizer`.
    """
    manifest_path = pathlib.Path(corpus_dir) / "manifest.json"
    manifest = manifest_path.read_text() if manifest_path.exists() else str(corpus_dir)
    key = _key(manifest, vocab_size, sample_bytes, "v1")
    out = pathlib.Path(cache_dir or default_cache_dir()) / f"tokenizer-{vocab_size}-{key}"
    model = out / "tokenizer.model"
    if model.exists():
        return str(model)
    _announce(f"training a {vocab_size}-piece sentencepiece tokenizer in {out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=out.name + ".tmp", dir=out.parent))
    texts = list(corpus_texts(corpus_dir, "train", sample_bytes))
    from internlm2_jax.data.tokenizer_training import train_tokenizer

    train_tokenizer(texts, str(tmp / "tokenizer"), vocab_size)
    try:
        os.rename(tmp, out)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(model)
