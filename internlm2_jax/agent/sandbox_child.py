"""The interpreter cell runner: executed as a script in the sandbox's child process, never imported.

    python -I sandbox_child.py ROOT < code

It installs an audit hook (PEP 578) before reading the cell, then runs the cell like a notebook cell: the
value of a final expression is printed. The hook refuses, with a `PermissionError` the cell sees:

  * sockets (`socket.__new__`, and `socket.connect`/`bind`/`getaddrinfo` for sockets made before the hook);
  * opening a file for writing (any write/append/create mode or flag) outside ROOT, and removing, renaming,
    linking, creating directories or changing modes outside ROOT;
  * starting programs or forking (`subprocess.Popen`, `os.system`, `os.exec*`, `os.spawn*`, `os.posix_spawn`,
    `os.fork`): a new program would start without this hook.

Audit hooks only see what goes through Python: native code (ctypes, C extensions) can bypass them. The parent
(`sandbox.py`) adds what the kernel enforces: resource limits and, where available, a network namespace.
This file imports only the standard library, so it runs under any Python with `-I`.
"""

import ast
import os
import sys
import traceback

ROOT = os.path.realpath(sys.argv[1]) if __name__ == "__main__" else ""  # importing this file runs nothing
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_NO_NETWORK = {"socket.__new__", "socket.connect", "socket.bind", "socket.getaddrinfo", "socket.sendto"}
_NO_PROCESS = ("subprocess.Popen", "os.system", "os.exec", "os.spawn", "os.posix_spawn", "os.fork", "os.forkpty",
               "pty.spawn")
# Events whose leading path arguments are changed on disk (the second one too for rename/link).
_PATH_EVENTS = {"os.remove": 1, "os.rmdir": 1, "os.mkdir": 1, "os.chmod": 1, "os.chown": 1, "os.truncate": 1,
                "os.utime": 1, "shutil.rmtree": 1, "os.rename": 2, "os.link": 2, "os.symlink": 2}


def _inside(path) -> bool:
    if isinstance(path, int):  # an already open descriptor: its opening was checked
        return True
    try:
        full = os.path.realpath(os.fsdecode(path))
    except (TypeError, ValueError):
        return False
    return full == ROOT or full.startswith(ROOT + os.sep)


def _writes(mode, flags) -> bool:
    if isinstance(mode, str) and any(c in mode for c in "wax+"):
        return True
    return isinstance(flags, int) and bool(flags & _WRITE_FLAGS)


def _hook(event: str, args: tuple) -> None:
    if event in _NO_NETWORK:
        raise PermissionError("network access is disabled in the sandbox")
    if event.startswith(_NO_PROCESS):
        raise PermissionError("starting processes is disabled in the sandbox")
    if event == "open" and _writes(args[1], args[2]) and not _inside(args[0]):
        raise PermissionError(f"writing outside the sandbox directory is refused: {args[0]}")
    n = _PATH_EVENTS.get(event)
    if n:
        for path in args[:n]:
            if isinstance(path, (str, bytes, os.PathLike)) and not _inside(path):
                raise PermissionError(f"changing files outside the sandbox directory is refused: {path}")


def _run(code: str) -> int:
    """Runs the cell; a trailing expression's repr is printed (as a notebook shows it). Returns the exit code."""
    namespace = {"__name__": "__main__"}
    try:
        tree = ast.parse(code, "<cell>", "exec")
        last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
        exec(compile(tree, "<cell>", "exec"), namespace)
        if last is not None:
            value = eval(compile(ast.Expression(last.value), "<cell>", "eval"), namespace)
            if value is not None:
                print(repr(value))
        return 0
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 0
    except BaseException as e:  # noqa: BLE001 - the cell's error is its output
        tb = traceback.extract_tb(e.__traceback__)
        user = [f for f in tb if f.filename == "<cell>"]  # this runner's own frames are noise
        print("Traceback (most recent call last):\n" + "".join(traceback.format_list(user))
              + "".join(traceback.format_exception_only(type(e), e)), end="", file=sys.stderr)
        return 1


if __name__ == "__main__":
    source = sys.stdin.read()
    os.chdir(ROOT)
    sys.addaudithook(_hook)
    sys.stdout.flush()
    code = _run(source)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
