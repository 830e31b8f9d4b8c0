"""The `<|interpreter|>` sandbox: each code cell runs in a fresh, limited Python subprocess.

What is enforced, and by whom:

| limit | how | what the model sees |
|---|---|---|
| wall time | the parent kills the child's process group after `timeout_s` | `TimeoutError: ... killed after N s` |
| CPU time | `RLIMIT_CPU` (`timeout_s` + 1 s) | the same message (SIGXCPU / SIGKILL) |
| memory | `RLIMIT_AS` (`memory_mb` of address space) | the cell's own `MemoryError` traceback |
| file size | `RLIMIT_FSIZE` (`file_mb`; also caps the captured output file) | `OSError`/"file size limit" |
| network | audit hook refusing sockets + `unshare -rn` (no interfaces) where it works | `PermissionError: network ...` |
| writes | audit hook: write-mode `open`, remove/rename/mkdir/chmod outside its dir | `PermissionError: writing ...` |
| processes | the audit hook refuses subprocess/exec/spawn/fork | `PermissionError: starting processes ...` |
| output | the first `output_chars` characters are kept, then a `[... truncated]` line | |

Not enforced: audit hooks see only what goes through Python, so native code (ctypes, C extensions) can write
files or open sockets without the hook (the namespace still cuts the network when it is in use); reads are
not restricted (the cell can read any file the user can); CPU cores are not limited. This is a guard against
a model's mistakes, not against an adversary: run untrusted models inside a container or VM.

The cwd of every cell is the sandbox's own temporary directory (files the user passes are copied in), so files
persist between the cells of one conversation while variables do not (each cell is a new process).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from typing import Optional, Sequence

_CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_child.py")


@dataclasses.dataclass(frozen=True)
class SandboxLimits:
    """Per-cell limits (see the module docstring for how each is enforced)."""

    timeout_s: float = 10.0
    memory_mb: int = 1024
    file_mb: int = 64
    output_chars: int = 2000
    network_namespace: bool = True  # use `unshare -rn` when it works here


@dataclasses.dataclass(frozen=True)
class CellResult:
    """What one cell printed (stdout and stderr interleaved, truncated) and how it ended."""

    output: str
    ok: bool
    reason: str = ""  # "timeout", "signal N", "error" (a traceback), or "" when it ran through


@functools.lru_cache(maxsize=1)
def _unshare_works() -> bool:
    """Whether `unshare -rn` can make a network namespace here (user namespaces may be disabled)."""
    exe = shutil.which("unshare")
    if exe is None:
        return False
    try:
        return subprocess.run([exe, "-rn", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _limit(limits: SandboxLimits) -> None:
    """Runs in the child between fork and exec: the kernel-enforced limits."""
    mb = 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limits.memory_mb * mb,) * 2)
    cpu = int(limits.timeout_s) + 1
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits.file_mb * mb,) * 2)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


class Sandbox:
    """A temporary directory plus the limits its cells run under; `close()` (or `with`) removes the directory."""

    def __init__(self, limits: SandboxLimits = SandboxLimits(), files: Sequence[str] = ()):
        self.limits = limits
        self.root = tempfile.mkdtemp(prefix="internlm2_agent_")
        self._private = tempfile.mkdtemp(prefix="internlm2_agent_out_")  # captured output, outside `root`
        self.network_namespace = limits.network_namespace and _unshare_works()
        for path in files:
            self.add_file(path)

    def add_file(self, path: str) -> str:
        """Copies `path` into the sandbox directory; returns its name there (what the cell opens)."""
        name = os.path.basename(path)
        shutil.copyfile(path, os.path.join(self.root, name))
        return name

    def _command(self) -> list[str]:
        cmd = [sys.executable, "-I", _CHILD, self.root]
        return (["unshare", "-rn"] + cmd) if self.network_namespace else cmd

    def _env(self) -> dict[str, str]:
        # No inherited secrets or proxies; caches and temp files land in the sandbox directory.
        return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": self.root, "TMPDIR": self.root,
                "MPLCONFIGDIR": self.root, "LANG": "C.UTF-8", "PYTHONIOENCODING": "utf-8",
                "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

    def run(self, code: str) -> CellResult:
        """Runs one cell; never raises for anything the cell does."""
        lim = self.limits
        out_path = os.path.join(self._private, "out.txt")
        with open(out_path, "wb") as out:
            proc = subprocess.Popen(self._command(), stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT,
                                    cwd=self.root, env=self._env(), start_new_session=True,
                                    preexec_fn=functools.partial(_limit, lim))
            timed_out = False
            try:
                proc.communicate(code.encode("utf-8"), timeout=lim.timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
                os.killpg(proc.pid, signal.SIGKILL)  # the whole group: the cell cannot leave children behind
                proc.wait()
        size = os.path.getsize(out_path)
        with open(out_path, "rb") as f:  # a flood of output is never read whole
            text = f.read(4 * lim.output_chars).decode("utf-8", "replace")
        if len(text) > lim.output_chars or size > 4 * lim.output_chars:
            text = text[:lim.output_chars] + f"\n[... output truncated: {size} bytes in all]"
        rc = proc.returncode
        if timed_out or rc in (-signal.SIGXCPU, -signal.SIGKILL):
            return CellResult(text + f"\nTimeoutError: the cell was killed after {lim.timeout_s:g} s", False,
                              "timeout")
        if rc == -signal.SIGXFSZ:
            return CellResult(text + f"\nOSError: the file size limit ({lim.file_mb} MB) was exceeded", False,
                              "signal SIGXFSZ")
        if rc is not None and rc < 0:
            return CellResult(text + f"\nthe cell was killed by signal {signal.Signals(-rc).name}", False,
                              f"signal {-rc}")
        return CellResult(text, rc == 0, "" if rc == 0 else "error")

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
        shutil.rmtree(self._private, ignore_errors=True)

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def run_cell(code: str, limits: SandboxLimits = SandboxLimits(), files: Optional[Sequence[str]] = None) -> CellResult:
    """One cell in a throwaway sandbox."""
    with Sandbox(limits, files or ()) as box:
        return box.run(code)
