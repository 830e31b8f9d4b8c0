"""Dependency sorting of a repository's files: imported files come before their importers.

Imports are resolved to files of the same repository: Python ``import``/``from`` (via ``ast``,
regex fallback on syntax errors, relative imports included), JS/TS ``require()``/``import ...
from`` with relative paths, C/C++ ``#include "..."``. Order = Kahn's topological sort taking the
lexicographically smallest ready path first; on a cycle, the remaining file with the fewest
unresolved dependencies (ties: smallest path) is emitted next -- deterministic for any input order.
"""

from __future__ import annotations

import ast
import heapq
import posixpath
import re
from collections.abc import Mapping, Sequence

from .code import to_markdown
from .records import Record

_PY_RE = re.compile(r"^\s*(?:from\s+(\.*[\w.]*)\s+import\s+([\w*, ]+)|import\s+([\w., ]+))", re.M)
_JS_RE = re.compile(r"""(?:require\(\s*|import\s+(?:[^'"]*?\s+from\s+)?)['"](\.{1,2}/[^'"]+)['"]""")
_C_RE = re.compile(r'^\s*#\s*include\s+"([^"]+)"', re.M)


def _py_module_candidates(path: str, text: str) -> list[str]:
    """Dotted module names (absolute, relative ones resolved against ``path``) imported by a file."""
    pkg = posixpath.dirname(path).replace("/", ".")
    names: list[tuple[int, str, list[str]]] = []  # (level, module, imported names)
    try:
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Import):
                names += [(0, a.name, []) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names.append((node.level, node.module or "", [a.name for a in node.names]))
    except (SyntaxError, ValueError):
        for m in _PY_RE.finditer(text):
            if m.group(3):
                names += [(0, n.strip().split(" ")[0], []) for n in m.group(3).split(",")]
            else:
                mod = m.group(1)
                level = len(mod) - len(mod.lstrip("."))
                names.append((level, mod.lstrip("."), [n.strip() for n in m.group(2).split(",")]))
    out = []
    for level, mod, imported in names:
        if level:
            parts = pkg.split(".") if pkg else []
            base = parts[: len(parts) - (level - 1)] if level - 1 <= len(parts) else []
            mod = ".".join([*base, mod] if mod else base)
        out.append(mod)
        out += [f"{mod}.{n}" if mod else n for n in imported if n != "*"]
    return out


def imports(path: str, text: str, files: Sequence[str]) -> set[str]:
    """Repository files that ``path`` depends on (itself excluded)."""
    fileset = set(files)
    deps: set[str] = set()
    if path.endswith(".py"):
        by_module: dict[str, str] = {}
        for f in files:
            if f.endswith(".py"):
                mod = f[:-3].replace("/", ".")
                by_module[mod.removesuffix(".__init__")] = f
        keys = sorted(by_module, key=lambda k: (len(k), k))
        for mod in _py_module_candidates(path, text):
            if not mod:
                continue
            # Exact dotted name, else a module under some source root (".../pkg/mod.py").
            f = by_module.get(mod) or next((by_module[k] for k in keys if k.endswith("." + mod)), None)
            if f:
                deps.add(f)
    elif path.endswith((".js", ".ts", ".jsx", ".tsx", ".mjs")):
        for rel in _JS_RE.findall(text):
            base = posixpath.normpath(posixpath.join(posixpath.dirname(path), rel))
            for cand in (base, *(base + e for e in (".js", ".ts", ".jsx", ".tsx", ".mjs")),
                         base + "/index.js", base + "/index.ts"):
                if cand in fileset:
                    deps.add(cand)
                    break
    elif path.endswith((".c", ".h", ".cc", ".cpp", ".hpp")):
        for inc in _C_RE.findall(text):
            local = posixpath.normpath(posixpath.join(posixpath.dirname(path), inc))
            if local in fileset:
                deps.add(local)
            else:
                deps.update(f for f in files if f == inc or f.endswith("/" + inc))
    deps.discard(path)
    return deps


def dependency_order(files: Mapping[str, str]) -> list[str]:
    """Paths ordered so that dependencies precede dependents (cycles broken deterministically)."""
    paths = sorted(files)
    deps = {p: imports(p, files[p], paths) for p in paths}
    users: dict[str, set[str]] = {p: set() for p in paths}
    for p, ds in deps.items():
        for d in ds:
            users[d].add(p)
    remaining = {p: len(ds) for p, ds in deps.items()}
    ready = [p for p in paths if remaining[p] == 0]
    heapq.heapify(ready)
    order: list[str] = []
    done: set[str] = set()
    while len(order) < len(paths):
        if not ready:  # cycle: emit the least-blocked remaining file
            p = min((p for p in paths if p not in done), key=lambda q: (remaining[q], q))
            remaining[p] = 0
        else:
            p = heapq.heappop(ready)
            if p in done:
                continue
        order.append(p)
        done.add(p)
        for u in sorted(users[p]):
            if u not in done:
                remaining[u] -= 1
                if remaining[u] == 0:
                    heapq.heappush(ready, u)
    return order


def repository_documents(records: Sequence[Record], max_chars: int) -> list[str]:
    """Markdown-formatted files of ONE repository in dependency order, packed greedily into
    documents of at most ``max_chars`` (a single larger file becomes its own document); files are
    repeated ``meta['repeats']`` times (default 1) in separate passes."""
    by_path = {r["meta"].get("path", r["id"]): r for r in records}
    order = dependency_order({p: r["text"] for p, r in by_path.items()})
    max_rep = max((int(r["meta"].get("repeats", 1)) for r in records), default=1)
    docs: list[str] = []
    for rep in range(max_rep):
        cur = ""
        for p in order:
            if int(by_path[p]["meta"].get("repeats", 1)) <= rep:
                continue
            block = to_markdown(by_path[p])
            if cur and len(cur) + len(block) > max_chars:
                docs.append(cur)
                cur = ""
            cur += block
        if cur:
            docs.append(cur)
    return docs
