"""The InternLM2 tool loop: the model answers, calls a plugin or writes interpreter code; the agent runs the call
and appends the result as an `environment` turn; repeat until a plain answer or `max_turns` model turns.

    agent = Agent(LocalBackend(config, params, tokenizer), plugins=[CALCULATOR], interpreter=SandboxLimits())
    run = agent.run("What is 4821*37?")         # run.messages, run.answer, run.tool_calls, run.stop

Several questions advance together (`run_batch`): each turn, one batched generation serves every
conversation still going. A plugin error, a malformed action or a failing cell is an observation for the
model, never an exception of the agent.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Protocol, Sequence

from internlm2_jax.agent import protocol
from internlm2_jax.agent.plugins import Plugin, call_plugin
from internlm2_jax.agent.sandbox import Sandbox, SandboxLimits

Message = dict[str, Any]


class Backend(Protocol):
    """Something that continues conversations: one parsed assistant reply (and a parse error) per conversation."""

    def reply(self, conversations: Sequence[Sequence[Message]]) -> list[tuple[Message, Optional[str]]]:
        ...


@dataclasses.dataclass
class AgentRun:
    """One question's conversation and how it ended."""

    messages: list[Message]
    answer: Optional[str] = None
    tool_calls: int = 0  # actions the model made: run (plugins called, cells run) or refused as malformed
    tool_errors: int = 0
    stop: str = ""  # "answer" or "max_turns"
    sandbox: Optional[Sandbox] = dataclasses.field(default=None, repr=False)


class Agent:
    """Runs the tool loop over a `Backend` with `plugins` and, when `interpreter` limits are given, a sandbox."""

    def __init__(self, backend: Backend, plugins: Sequence[Plugin] = (), interpreter: Optional[SandboxLimits] = None,
                 max_turns: int = 4, system: Optional[str] = None):
        if max_turns < 1:
            raise ValueError(f"max_turns must be at least 1, got {max_turns}")
        self.backend, self.plugins, self.interpreter = backend, list(plugins), interpreter
        self.max_turns, self.system = max_turns, system

    def start(self, question: str, files: Sequence[str] = ()) -> AgentRun:
        """The opening turns: system prompt, tool descriptions, the question, then the files turn."""
        if files and self.interpreter is None:
            raise ValueError("files are read by the interpreter: enable it to pass files")
        messages: list[Message] = [{"role": "system", "content": self.system}] if self.system else []
        tools = protocol.plugins_turn(self.plugins)
        messages += [tools] if tools else []
        messages += [protocol.interpreter_turn()] if self.interpreter else []
        messages.append({"role": "user", "content": question})
        box = Sandbox(self.interpreter, files) if self.interpreter else None
        if files:
            messages.append(protocol.files_turn(files))
        return AgentRun(messages, sandbox=box)

    def execute(self, run: AgentRun, call: dict[str, Any]) -> Message:
        """Runs one tool call; the environment turn that reports it."""
        run.tool_calls += 1
        if call.get("type") == "interpreter":
            if run.sandbox is None:
                run.tool_errors += 1
                return protocol.environment("interpreter", "error: the interpreter is not enabled")
            cell = run.sandbox.run(call["code"])
            run.tool_errors += not cell.ok
            return protocol.environment("interpreter", cell.output)
        text, ok = call_plugin(self.plugins, call["name"], call.get("parameters", {}))
        run.tool_errors += not ok
        return protocol.environment("plugin", text)

    def step(self, runs: Sequence[AgentRun]) -> list[AgentRun]:
        """One model turn for each run; returns the runs that go on (they made a tool call)."""
        going = []
        for run, (msg, error) in zip(runs, self.backend.reply([r.messages for r in runs])):
            run.messages.append(msg)
            if error is not None:
                run.tool_calls, run.tool_errors = run.tool_calls + 1, run.tool_errors + 1
                run.messages.append(protocol.environment(protocol.action_kind(msg["content"]), f"error: {error}"))
                going.append(run)
            elif msg.get("tool_call") is not None:
                run.messages.append(self.execute(run, msg["tool_call"]))
                going.append(run)
            else:
                run.answer, run.stop = msg["content"], "answer"
        return going

    def run_batch(self, questions: Sequence[str], files: Sequence[str] = ()) -> list[AgentRun]:
        """Runs every question to an answer or `max_turns` model turns (sandboxes removed at the end)."""
        runs = [self.start(q, files) for q in questions]
        try:
            going = list(runs)
            for _ in range(self.max_turns):
                if not going:
                    break
                going = self.step(going)
            for run in going:
                run.stop = "max_turns"
        finally:
            for run in runs:
                if run.sandbox is not None:
                    run.sandbox.close()
                    run.sandbox = None
        return runs

    def run(self, question: str, files: Sequence[str] = ()) -> AgentRun:
        """One question through the loop."""
        return self.run_batch([question], files)[0]
