"""InternLM2's tool loop: plugins, a sandboxed code interpreter, and the model in-process or behind a server.

`docs/agents.md` describes the protocol, the sandbox's limits and the tool-use demo.
"""

from internlm2_jax.agent.backends import LocalBackend, OpenAIBackend
from internlm2_jax.agent.loop import Agent, AgentRun
from internlm2_jax.agent.plugins import BUILTIN_PLUGINS, CALCULATOR, Plugin, call_plugin
from internlm2_jax.agent.sandbox import CellResult, Sandbox, SandboxLimits, run_cell

__all__ = ["Agent", "AgentRun", "BUILTIN_PLUGINS", "CALCULATOR", "CellResult", "LocalBackend", "OpenAIBackend",
           "Plugin", "Sandbox", "SandboxLimits", "call_plugin", "run_cell"]
