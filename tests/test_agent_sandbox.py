"""The interpreter sandbox: runaway cells are stopped, forbidden actions refused, and the agent goes on."""

import dataclasses
import os
import socket

import pytest

from agent_scripted import ScriptedBackend
from internlm2_jax.agent import Agent, Sandbox, SandboxLimits, run_cell

LIMITS = SandboxLimits(timeout_s=3, memory_mb=512, output_chars=300)


def _interp(code):
    return f"<|action_start|><|interpreter|>\n{code}<|action_end|>"


def test_cell_output_and_last_expression():
    r = run_cell("print('hi')\nx = 6\nx * 7", LIMITS)
    assert (r.ok, r.output) == (True, "hi\n42\n")


def test_infinite_loop_is_killed_on_time():
    r = run_cell("while True:\n    pass", LIMITS)
    assert not r.ok and r.reason == "timeout" and "TimeoutError: the cell was killed after 3 s" in r.output


def test_too_much_memory_is_refused():
    r = run_cell("b = bytearray(2 * 1024 ** 3)\nprint('allocated')", LIMITS)
    assert not r.ok and "MemoryError" in r.output and "allocated" not in r.output


@pytest.mark.parametrize("code", [
    "open({path!r}, 'w').write('x')",
    "open('../escaped.txt', 'a').write('x')",
    "import os; os.open({path!r}, os.O_WRONLY | os.O_CREAT)",
    "import shutil; shutil.copy('ok.txt', {path!r})",
    "import os; os.rename('ok.txt', {path!r})",
])
def test_writes_outside_the_directory_are_refused(tmp_path, code):
    target = str(tmp_path / "outside.txt")
    with Sandbox(LIMITS) as box:
        assert box.run("open('ok.txt', 'w').write('inside')").ok  # inside is fine, and persists
        r = box.run(code.format(path=target))
        assert not r.ok and "PermissionError" in r.output and "outside the sandbox directory" in r.output
        assert os.path.exists(os.path.join(box.root, "ok.txt"))
    assert not os.path.exists(target) and not os.path.exists(os.path.join(os.path.dirname(box.root), "escaped.txt"))


@pytest.mark.parametrize("code", [
    "import socket; socket.socket()",
    "import socket; socket.create_connection(('127.0.0.1', {port}), timeout=1)",
    "import urllib.request; urllib.request.urlopen('http://127.0.0.1:{port}/', timeout=1)",
])
@pytest.mark.parametrize("namespace", [True, False], ids=["with_netns", "hook_only"])
def test_sockets_are_refused(code, namespace):
    """The audit hook refuses sockets by itself (`hook_only`); the namespace, where it works, is a second wall."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    try:
        limits = dataclasses.replace(LIMITS, network_namespace=namespace)
        r = run_cell(code.format(port=server.getsockname()[1]), limits)
    finally:
        server.close()
    assert not r.ok and "network access is disabled in the sandbox" in r.output


def test_processes_are_refused():
    r = run_cell("import subprocess; subprocess.run(['echo', 'hi'])", LIMITS)
    assert not r.ok and "starting processes is disabled" in r.output


def test_output_is_truncated():
    r = run_cell("print('x' * 100000)", LIMITS)
    assert r.ok and r.output.startswith("x" * 300) and "[... output truncated: 100001 bytes in all]" in r.output
    assert len(r.output) < 400


def test_agent_goes_on_after_each_failure():
    script = [_interp("while True: pass"), _interp("bytearray(2 * 1024 ** 3)"), _interp("open('/etc/x', 'w')"),
              _interp("import socket; socket.socket()"), _interp("21 * 2"), "It is 42.<|im_end|>"]
    run = Agent(ScriptedBackend(script), interpreter=LIMITS, max_turns=6).run("What is 21*2?")
    env = [m["content"] for m in run.messages if m["role"] == "environment"]
    assert "TimeoutError" in env[0] and "MemoryError" in env[1] and "outside the sandbox directory" in env[2]
    assert "network access is disabled" in env[3] and env[4] == "42\n"
    assert all(m["name"] == "interpreter" for m in run.messages if m["role"] == "environment")
    assert (run.answer, run.stop, run.tool_calls, run.tool_errors) == ("It is 42.", "answer", 5, 4)
