"""The agent's turns in InternLM2's chat format, built from the project's one renderer and parsers.

  * the tools list: `system name=<|plugin|>` with the functions as `json.dumps(indent=4)` + "\\n", made by the
    server's own converter (`serving.openai_chat`), so a prompt is the same token for token whether the agent
    runs the model in-process or through `experiments.serve`'s chat endpoint;
  * the interpreter: a `system name=<|interpreter|>` turn describing it, and files the user passes as a
    `user name=file` turn (`[{"path": ..., "size": ...}]`, as in InternLM's chat_format.md);
  * the model's reply (decoded with special tokens kept, up to `<|action_end|>` or `<|im_end|>`) is read back
    with `sft.formats.parse_chatml`, the parser of ChatML training data, so a call renders back identically;
  * tool results are `environment name=<|plugin|>` / `name=<|interpreter|>` turns.
"""

from __future__ import annotations

import importlib.util
import json
import os
from typing import Any, Optional, Sequence

from internlm2_jax.agent.plugins import Plugin
from internlm2_jax.serving.openai_chat import _tools_turn
from internlm2_jax.sft.formats import FormatError, parse_chatml

Message = dict[str, Any]
_TAIL = ("<|im_end|>", "</s>")


def plugins_turn(plugins: Sequence[Plugin]) -> Optional[Message]:
    """The `system name=<|plugin|>` turn listing `plugins` (None when there are none)."""
    return _tools_turn([{"type": "function", "function": p.spec()} for p in plugins], None)


def interpreter_turn() -> Message:
    """The `system name=<|interpreter|>` turn: what the code cells can do (says whether pandas is there)."""
    pandas = importlib.util.find_spec("pandas") is not None
    tables = ("pandas is installed" if pandas else
              "pandas is not installed: read CSV files with the csv module")
    return {"role": "system", "name": "interpreter", "content": (
        "You can run Python code: write it in an interpreter action and its printed output (and the value of "
        "the last expression) comes back. Each run is a new process with time and memory limits and no "
        f"network; files are in the current directory. {tables}.")}


def files_turn(paths: Sequence[str]) -> Message:
    """The `user name=file` turn naming the files copied into the sandbox directory."""
    def size(path: str) -> str:
        n = os.path.getsize(path)
        return f"{n} B" if n < 1024 else f"{n / 1024:.1f}K"

    return {"role": "user", "name": "file",
            "content": json.dumps([{"path": os.path.basename(p), "size": size(p)} for p in paths],
                                  ensure_ascii=False)}


def environment(kind: str, text: str) -> Message:
    """A tool result turn; `kind` is "plugin" or "interpreter"."""
    return {"role": "environment", "name": kind, "content": text}


def parse_reply(text: str) -> tuple[Message, Optional[str]]:
    """`(assistant message, error)` of the model's generated text (special tokens kept).

    A well-formed action becomes the message's `tool_call`; a malformed one (bad JSON, no closing
    `<|action_end|>`, no name) keeps the raw text as content and comes with an error for the environment.
    """
    while text.endswith(_TAIL):
        text = text[:-len(next(t for t in _TAIL if text.endswith(t)))]
    if "<|action_start|>" not in text:
        return {"role": "assistant", "content": text}, None
    raw = {"role": "assistant", "content": text}
    try:
        (msg,) = parse_chatml(f"<|im_start|>assistant\n{text}<|im_end|>")
    except (FormatError, ValueError, KeyError, TypeError) as e:
        return raw, f"could not read the action: {e}"
    if "tool_call" not in msg:
        return raw, "could not read the action: it must end with <|action_end|> and nothing after it"
    call = msg["tool_call"]
    if call.get("type") != "interpreter" and not (isinstance(call.get("name"), str) and call["name"]):
        return raw, "could not read the action: a plugin call needs a \"name\""
    return msg, None


def action_kind(text: str) -> str:
    """"interpreter" when `text` holds an interpreter action, else "plugin" (names an error's environment)."""
    return "interpreter" if "<|interpreter|>" in text else "plugin"
