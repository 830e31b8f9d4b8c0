"""Code pipeline: formatting, indent-insensitive dedup, tiers and dependency sorting."""

from __future__ import annotations

from internlm2_jax.data import code, code_deps
from internlm2_jax.data.records import make_record


def _rec(path: str, text: str, **meta):
    lang = {"py": "python", "js": "javascript", "c": "c", "h": "c"}[path.rsplit(".", 1)[1]]
    return make_record(f"repo/{path}", text, "code", lang="code", type="code",
                       meta={"repo": "repo", "path": path, "language": lang, **meta})


def test_markdown_format():
    r = _rec("pkg/a.py", "x = 1\n")
    assert code.to_markdown(r) == "```python\n# pkg/a.py\nx = 1\n```\n"
    assert code.to_markdown(_rec("m.c", "int x;")) == "```c\n// m.c\nint x;\n```\n"


def test_indent_insensitive_dedup():
    a = _rec("a.py", "def f(x):\n    return x+1\n")
    b = _rec("b.py", "def f( x ):\n\treturn x + 1\n\n")  # only whitespace differs
    c = _rec("c.py", "def f(x):\n    return x+2\n")
    assert code.dedup_reasons([a, b, c]) == [None, "code_duplicate", None]


def test_quality_tiers():
    good = _rec("g.py", "# Utilities.\n\ndef add(a, b):\n    \"\"\"Add.\"\"\"\n    return a + b\n\n"
                "def sub(a, b):\n    return a - b\n")
    blob = _rec("d.py", "DATA = [" + ", ".join(str(i * 7919 % 10007) for i in range(3000)) + "]\n")
    mid = _rec("m.py", "x = compute_value(alpha, beta)\ny = x * 2\nz = y + x\nprint(z)\nw = z\n")
    reasons = code.assign_tiers([good, blob, mid], high_repeats=3)
    assert [r["meta"]["tier"] for r in (good, blob, mid)] == ["high", "low", "medium"]
    assert reasons == [None, "code_low_quality", None]
    assert good["meta"]["repeats"] == 3 and mid["meta"]["repeats"] == 1


REPO = {
    "pkg/__init__.py": "",
    "pkg/core.py": "import os\nfrom .util import helper\n\ndef run():\n    return helper()\n",
    "pkg/util.py": "def helper():\n    return 1\n",
    "main.py": "from pkg.core import run\nimport pkg.cli\nrun()\n",
    "pkg/cli.py": "from pkg import core\n",
    # cycle: a <-> b, both imported by c
    "cyc/a.py": "from cyc import b\n",
    "cyc/b.py": "from cyc import a\n",
    "cyc/c.py": "import cyc.a\nimport cyc.b\n",
    "web/app.js": "const u = require('./lib/u');\nimport x from './lib/x';\n",
    "web/lib/u.js": "module.exports = 1;\n",
    "web/lib/x.js": "export default 2;\n",
    "c/main.c": '#include "util.h"\n#include <stdio.h>\nint main(){return f();}\n',
    "c/util.h": "int f(void);\n",
}


def _before(order, first, then):
    return order.index(first) < order.index(then)


def test_dependency_order_imports_first_and_cycles():
    order = code_deps.dependency_order(REPO)
    assert sorted(order) == sorted(REPO)
    assert _before(order, "pkg/util.py", "pkg/core.py")
    assert _before(order, "pkg/core.py", "pkg/cli.py")
    assert _before(order, "pkg/core.py", "main.py") and _before(order, "pkg/cli.py", "main.py")
    assert _before(order, "cyc/a.py", "cyc/c.py") and _before(order, "cyc/b.py", "cyc/c.py")
    assert _before(order, "web/lib/u.js", "web/app.js") and _before(order, "web/lib/x.js", "web/app.js")
    assert _before(order, "c/util.h", "c/main.c")
    # Deterministic regardless of input order.
    assert code_deps.dependency_order(dict(reversed(list(REPO.items())))) == order


def test_imports_resolution():
    files = sorted(REPO)
    assert code_deps.imports("pkg/core.py", REPO["pkg/core.py"], files) == {"pkg/util.py"}
    assert code_deps.imports("main.py", REPO["main.py"], files) == {"pkg/core.py", "pkg/cli.py"}
    # Syntax errors fall back to regex parsing.
    assert code_deps.imports("x.py", "from pkg.util import helper\ndef (:\n", files) == {"pkg/util.py"}


def test_repository_documents_respects_context_and_repeats():
    recs = [_rec(p, t) for p, t in REPO.items() if p.endswith(".py")]
    for r in recs:
        r["meta"]["repeats"] = 2 if r["meta"]["path"] == "pkg/util.py" else 1
    docs = code_deps.repository_documents(recs, max_chars=200)
    joined = "".join(docs)
    assert joined.count("# pkg/util.py\n") == 2 and joined.count("# main.py\n") == 1
    assert joined.index("# pkg/util.py") < joined.index("# pkg/core.py")
    assert all(len(d) <= 200 or d.count("```") == 2 for d in docs)
