"""One run per workdir: an exclusive `flock` on `<workdir>/.lock`, released by the kernel if the process dies."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from typing import Optional

import jax

from internlm2_jax.errors import WorkdirBusyError


class WorkdirLock:
    """Held for the life of a stage; a second run on the same workdir gets `WorkdirBusyError` naming the holder.

    Only process 0 of a multi-process run locks (the others share its workdir). The lock file is never deleted
    (deleting a flock'ed file lets a third process lock a new inode); it holds the holder's pid, host and command.
    """

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, ".lock")
        self._fd: Optional[int] = None

    def acquire(self) -> "WorkdirLock":
        if jax.process_index() != 0:
            return self
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._holder(fd)
            os.close(fd)
            raise WorkdirBusyError(
                f"workdir {os.path.dirname(self.path)} is in use by pid {holder.get('pid', '?')} on "
                f"{holder.get('host', '?')} (since {holder.get('started', '?')}: {holder.get('command', '?')}); "
                "wait for that run, stop it, or use another --workdir") from None
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)[:300]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._fd = fd
        return self

    @staticmethod
    def _holder(fd: int) -> dict:
        try:
            return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        except ValueError:
            return {}

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "WorkdirLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
