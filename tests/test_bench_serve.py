"""`python -m experiments.bench_serve --quick` runs end to end (tiny sizes; the output format only, no timings)."""

import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quick_bench_serve_prints_the_speedup_line():
    cmd = [sys.executable, "-m", "experiments.bench_serve", "--quick", "--clients", "3", "--max-tokens", "4",
           "--no-hf-seq"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert re.fullmatch(r"speedup_vs_sequential=\d+\.\d+ speedup_vs_transformers=\d+\.\d+", lines[-1]), lines[-5:]
    assert any(line.startswith("server ") for line in lines) and any(line.startswith("hf_batch ") for line in lines)
