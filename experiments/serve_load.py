"""Streaming load for the OpenAI server from a process of its own, as real clients would be.

`LoadProcess(url).run(bodies)` sends every `/v1/completions` body at once as a streaming request (httpx on
one asyncio loop in a child process) and returns per request its start, each text chunk's arrival
time and `usage.completion_tokens`. Keeping the clients out of the server's interpreter means the benchmark
measures the server, not the clients' SSE parsing under the server's GIL. `time.perf_counter` is the
system-wide monotonic clock on Linux, so the times compare with the parent's.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from typing import Any, NamedTuple


class StreamResult(NamedTuple):
    tokens: int  # usage.completion_tokens
    start: float  # perf_counter when the request was sent
    times: list[float]  # arrival of each chunk with text
    texts: list[str]


async def _one(http: Any, body: dict) -> StreamResult:
    start, times, texts, n = time.perf_counter(), [], [], 0
    async with http.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            msg = json.loads(line[6:])
            if "error" in msg:
                raise RuntimeError(f"server error in stream: {msg['error']}")
            n = (msg.get("usage") or {}).get("completion_tokens", n)
            for c in msg.get("choices", []):
                if c.get("text"):
                    times.append(time.perf_counter())
                    texts.append(c["text"])
    return StreamResult(n, start, times, texts)


def _serve_rounds(url: str) -> None:
    """Child side: one JSON list of bodies per stdin line → one JSON line `[t0, t1, results]` (or an error)."""
    import httpx

    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)  # httpx binds its pool to the current loop
    http = httpx.AsyncClient(base_url=url, timeout=600,
                             limits=httpx.Limits(max_connections=None, max_keepalive_connections=None))
    for line in sys.stdin:
        bodies = json.loads(line)
        try:
            t0 = time.perf_counter()
            res = loop.run_until_complete(asyncio.gather(*(_one(http, b) for b in bodies)))
            out: Any = [t0, time.perf_counter(), [list(r) for r in res]]
        except Exception as e:  # reported to the parent, which raises it
            out = f"{type(e).__name__}: {e}"
        sys.stdout.write(json.dumps(out) + "\n")
        sys.stdout.flush()
    loop.run_until_complete(http.aclose())


class LoadProcess:
    """One client process against `url` (`python -m experiments.serve_load URL`, which imports no JAX);
    `run` may be called repeatedly (connections are kept alive)."""

    def __init__(self, url: str):
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # where `experiments` imports from
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        self._proc = subprocess.Popen([sys.executable, "-m", "experiments.serve_load", url], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, text=True, env=env)

    def run(self, bodies: list[dict]) -> tuple[float, float, list[StreamResult]]:
        """(round start, round end, one `StreamResult` per body, in order)."""
        self._proc.stdin.write(json.dumps(bodies) + "\n")
        self._proc.stdin.flush()
        line = self._proc.stdout.readline()
        if not line:
            raise RuntimeError(f"load process exited with {self._proc.wait()}")
        out = json.loads(line)
        if isinstance(out, str):
            raise RuntimeError(f"load process: {out}")
        t0, t1, res = out
        return t0, t1, [StreamResult(*r) for r in res]

    def close(self) -> None:
        self._proc.stdin.close()
        self._proc.wait(30)


if __name__ == "__main__":
    _serve_rounds(sys.argv[1])
