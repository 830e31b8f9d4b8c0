"""How the last training loop of this process ended, for the entry point's summary line and exit code."""

from __future__ import annotations

import dataclasses
from typing import Literal, Optional

Status = Literal["finished", "stopped", "already_complete"]


@dataclasses.dataclass(frozen=True)
class RunOutcome:
    """`status` of a `run_loop`: it ran to `num_steps`, was stopped by `signal` after saving, or found the
    workdir's checkpoint already at `num_steps` (nothing to do)."""

    status: Status
    step: int
    num_steps: int
    workdir: str
    num_steps_name: str = "num_steps"
    signal: Optional[int] = None
    resumed_from: Optional[int] = None

    def summary(self) -> str:
        """One human line, e.g. "stopped at step 109 (SIGTERM) — run the same command to resume"."""
        if self.status == "stopped":
            name = {2: "SIGINT", 15: "SIGTERM"}.get(self.signal or 0, f"signal {self.signal}")
            return (f"stopped at step {self.step} of {self.num_steps} ({name}); checkpoint saved in {self.workdir} "
                    "— run the same command to resume")
        if self.status == "already_complete":
            return (f"already complete at step {self.step} ({self.num_steps_name}={self.num_steps}) in "
                    f"{self.workdir}; nothing to do (raise {self.num_steps_name} to train further)")
        start = f" (resumed from step {self.resumed_from})" if self.resumed_from else ""
        return f"finished {self.num_steps} steps{start}; outputs in {self.workdir}"


_LAST: list[RunOutcome] = []


def record(o: RunOutcome) -> None:
    _LAST[:] = [o]


def last() -> Optional[RunOutcome]:
    """The outcome of the most recent loop of this process (None when no loop ran since `reset`)."""
    return _LAST[0] if _LAST else None


def reset() -> None:
    _LAST.clear()
