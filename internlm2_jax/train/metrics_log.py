"""Per-step metrics to `metrics.jsonl` and TensorBoard event files."""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Any

log = logging.getLogger(__name__)

DISCARDED = "metrics.discarded.jsonl"
"""Rows a resume superseded (past the restored step) are appended here, never deleted."""


def _parse(path: str) -> tuple[list[tuple[str, dict]], list[str]]:
    """`([(raw line, row)], [unreadable raw lines])` of a metrics file; a torn line (a write cut short by a
    crash or full disk) is reported with its line number and kept aside, never fatal."""
    rows, bad = [], []
    with open(path, errors="replace") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError("not an object")
                rows.append((line if line.endswith("\n") else line + "\n", row))
            except ValueError:
                log.warning("%s:%d: unreadable metrics row (torn write?) set aside", path, i)
                bad.append(line if line.endswith("\n") else line + "\n")
    return rows, bad


class MetricsLog:
    """Appends one JSON object per logged step.

    On open, the file is rewritten (atomically) to the rows up to `resume_step` — none when the run starts from
    scratch, since those rows came from a run that left no usable checkpoint — so a resumed run's log equals the
    uninterrupted one's. Rows past it, and torn lines, go to `metrics.discarded.jsonl` (nothing is lost).
    """

    def __init__(self, workdir: str, resume_step: int = 0, tensorboard: bool = True):
        os.makedirs(workdir, exist_ok=True)
        self.workdir = workdir
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._rewrite(resume_step)
        self._f = open(self.path, "a")
        self._tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def _rewrite(self, resume_step: int) -> None:
        if not os.path.exists(self.path):
            return
        rows, bad = _parse(self.path)
        keep = [raw for raw, row in rows if resume_step > 0 and row.get("step", 0) <= resume_step]
        drop = [raw for raw, row in rows if not (resume_step > 0 and row.get("step", 0) <= resume_step)] + bad
        if not drop:
            return
        with open(os.path.join(self.workdir, DISCARDED), "a") as f:
            f.writelines(drop)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(keep)
        os.replace(tmp, self.path)
        log.info("metrics.jsonl rewound to step %d; %d superseded rows kept in %s", resume_step, len(drop), DISCARDED)

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        row = {"step": int(step)}
        for k, v in metrics.items():
            v = float(v) if not isinstance(v, (str, bool)) else v
            row[k] = v
            if self._tb is not None and isinstance(v, float) and math.isfinite(v):
                self._tb.add_scalar(k, v, step)
        self._f.write(json.dumps(row) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    """All readable rows of `<workdir>/metrics.jsonl` (a torn line is reported and skipped)."""
    return [row for _, row in _parse(os.path.join(workdir, "metrics.jsonl"))[0]]
