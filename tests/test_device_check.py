"""The prepared accelerator check (`experiments/device_check.py`) runs its logic on this CPU (dry run)."""

from __future__ import annotations

import json

import pytest

from experiments import device_check


def _run(tmp_path, stages: str) -> dict:
    out = tmp_path / "dc.json"
    assert device_check.main(["--dry_run", "--stages", stages, "--out", str(out)]) == 0
    summary = json.loads(out.read_text())
    assert summary["dry_run"] and summary["ok"] and list(summary["stages"]) == stages.split(",")
    return summary


def test_dry_run_kernels_and_decode(tmp_path):
    summary = _run(tmp_path, "kernels,decode")
    cases = summary["stages"]["kernels"]["cases"]
    assert {c["kernel"] for c in cases} == {"flash", "decode", "model"}
    assert all(err < 1e-3 for c in cases for err in c["max_err"].values())
    assert summary["stages"]["decode"]["tokens_per_s"] > 0


@pytest.mark.slow
def test_dry_run_all_stages(tmp_path):
    summary = _run(tmp_path, "kernels,attention,train_step,decode")
    rows = summary["stages"]["attention"]["rows"]
    assert rows and all("pallas" in r["tflops"] and "xla" in r["tflops"] for r in rows)
    assert summary["stages"]["train_step"]["results"]["float32"]["jax"]["tokens_per_s"] > 0
