"""Per-step metrics to `metrics.jsonl` and TensorBoard event files."""

from __future__ import annotations

import json
import math
import os
from typing import Any


class MetricsLog:
    """Appends one JSON object per logged step; on resume drops entries past the restored step (all of them
    when the run starts from scratch: they came from a run that left no checkpoint)."""

    def __init__(self, workdir: str, resume_step: int = 0, tensorboard: bool = True):
        os.makedirs(workdir, exist_ok=True)
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._truncate(resume_step)
        self._f = open(self.path, "a")
        self._tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def _truncate(self, resume_step: int) -> None:
        if not os.path.exists(self.path):
            return
        with open(self.path) as f:
            keep = [line for line in f if resume_step > 0 and line.strip()
                    and json.loads(line).get("step", 0) <= resume_step]
        with open(self.path, "w") as f:
            f.writelines(keep)

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
    """All rows of `<workdir>/metrics.jsonl`."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]
