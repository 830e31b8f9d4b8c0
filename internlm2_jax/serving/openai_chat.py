"""OpenAI chat requests to InternLM2's chat format (`internlm2_jax.chat_format`), and tool calls back.

Request side, `to_internlm2(messages, tools, tool_choice)`:

    OpenAI                                               chat_format
    {"role": "system" | "developer", "content"}          {"role": "system", "content"}
    {"role": "user", "content"}                          {"role": "user", "content"}
    {"role": "assistant", "content"?, "tool_calls"?}     {"role": "assistant", "content", "tool_call"?}
      {"id", "type": "function", "function": {"name", "arguments": JSON}}   {"name", "parameters": parsed}
    {"role": "tool", "tool_call_id", "content"}          {"role": "environment", "name": "plugin", "content"}
    tools = [{"type": "function", "function": {...}}]    {"role": "system", "name": "plugin", "content": list}

`content` is a string or a list of `{"type": "text", "text"}` parts, joined with "\\n" (`refusal` parts count
as text); other parts (images, audio, files) are rejected: the model reads text only. OpenAI's optional
participant `name` is ignored: InternLM2's `name=` names a tool or a file, not a speaker.

The tools turn lists the function objects (`name`, `description`, `parameters`; others such as `strict`
are dropped) as `json.dumps(indent=4)` plus "\\n", after the leading system turns (first when there are
none), as in chat_format.md's function-call example:

    <|im_start|>system name=<|plugin|>\\n[\\n    {\\n        "name": ...\\n    }\\n]\\n<|im_end|>

Several calls in one assistant message: InternLM2 makes one call per assistant turn, followed by its
result. So the calls become consecutive assistant turns (the content goes with the first), each followed
by its own result: a tool message right after the assistant message, matched by `tool_call_id` (by
position when it has none); a call without a result is followed by the next call's turn directly. This is
the shape InternLM2 was trained on; several actions in one turn, or all results after all calls, are not.

`tool_choice`: "none" drops the tools turn (calls already in the history still render); "auto" or None
keeps it. "required" and a named function are rejected as not supported: nothing in InternLM2's prompt
forces a call, and listing only the named function would still let the model answer in plain text.

Response side, `parse_tool_calls(text)` (text decoded with special tokens kept):

    {content}<|action_start|><|plugin|>\\n{"name": ..., "parameters": {...}}<|action_end|>[<|im_end|>|</s>]
    -> (content, [{"id": "call_...", "type": "function", "function": {"name", "arguments": JSON string}}])

Several plugin actions in a row give several calls (whitespace around them is ignored). An `<|interpreter|>`
action (code for a Jupyter kernel) has no OpenAI counterpart, so an output with one comes back whole as content,
as does one whose actions do not parse (bad JSON, no name, unterminated, text after): models emit anything.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from internlm2_jax.chat_format import render_chat

ROLES = ("system", "developer", "user", "assistant", "tool")
TOOL_CHOICES = ("auto", "none")
_TAIL_SPECIALS = ("<|im_end|>", "</s>")
_ACTION = re.compile(r"<\|action_start\|>(<\|plugin\|>|<\|interpreter\|>)?(.*?)<\|action_end\|>", re.S)


def _text(content: Any, where: str, *, allow_none: bool = False) -> str:
    """A message's content as one string; `where` names the field in errors."""
    if content is None and not allow_none:
        raise ValueError(f"{where}: missing (a string or a list of text parts is required)")
    content = "" if content is None else content
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ValueError(f"{where}: must be a string or a list of text parts, got {type(content).__name__}")
    texts = []
    for k, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in ("text", "refusal"):
            shown = f"part type {kind!r}" if isinstance(part, dict) else f"a {type(part).__name__}"
            raise ValueError(f"{where}[{k}]: {shown} is not supported; only text parts are (the model reads text only)")
        if not isinstance(part.get(kind), str):
            raise ValueError(f"{where}[{k}].{kind}: must be a string")
        texts.append(part[kind])
    return "\n".join(texts)


def _function(fn: Any, where: str) -> dict[str, Any]:
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise ValueError(f"{where}.name: must be a non-empty string")
    return fn


def _tools_turn(tools: Any, tool_choice: Any) -> dict[str, Any] | None:
    """The `system name=<|plugin|>` turn listing the functions, or None."""
    if tool_choice is not None and tool_choice not in TOOL_CHOICES:
        if tool_choice == "required" or isinstance(tool_choice, dict):
            raise ValueError(f"tool_choice: {json.dumps(tool_choice, default=str)} is not supported (only 'auto' "
                             "and 'none'): InternLM2's prompt cannot force a tool call")
        raise ValueError(f"tool_choice: unknown value {tool_choice!r}; expected 'auto' or 'none'")
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise ValueError(f"tools: must be a list, got {type(tools).__name__}")
    functions = []
    for k, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise ValueError(f"tools[{k}].type: expected 'function'")
        fn = _function(tool.get("function"), f"tools[{k}].function")
        entry = {"name": fn["name"]}
        for key, kind in (("description", str), ("parameters", dict)):
            if fn.get(key) is not None:
                if not isinstance(fn[key], kind):
                    raise ValueError(f"tools[{k}].function.{key}: must be a {'string' if kind is str else 'object'}")
                entry[key] = fn[key]
        functions.append(entry)
    if tool_choice == "none" or not functions:
        return None
    return {"role": "system", "name": "plugin", "content": json.dumps(functions, indent=4, ensure_ascii=False) + "\n"}


def _calls(calls: Any, i: int) -> list[dict[str, Any]]:
    """An assistant message's `tool_calls` as `{"id", "name", "parameters"}`."""
    if not isinstance(calls, list):
        raise ValueError(f"messages[{i}].tool_calls: must be a list, got {type(calls).__name__}")
    out = []
    for k, call in enumerate(calls):
        where = f"messages[{i}].tool_calls[{k}]"
        if not isinstance(call, dict) or call.get("type", "function") != "function":
            raise ValueError(f"{where}.type: expected 'function'")
        fn = _function(call.get("function"), f"{where}.function")
        args = fn.get("arguments", "")
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except ValueError as e:
                raise ValueError(f"{where}.function.arguments: not valid JSON ({e})") from None
        if not isinstance(args, dict):
            raise ValueError(f"{where}.function.arguments: must be a JSON object, got {type(args).__name__}")
        out.append({"id": call.get("id"), "name": fn["name"], "parameters": args})
    return out


def _result(msg: dict[str, Any], n: int) -> dict[str, Any]:
    """A tool message as an environment turn."""
    return {"role": "environment", "name": "plugin", "content": _text(msg.get("content"), f"messages[{n}].content")}


def _match(calls: list[dict[str, Any]], messages: list[Any], i: int) -> tuple[dict[int, dict[str, Any]], int]:
    """Results of assistant `messages[i]`'s calls (the tool messages after it) by call number, and where they end."""
    end = i + 1
    while calls and end < len(messages) and isinstance(messages[end], dict) and messages[end].get("role") == "tool":
        end += 1
    ids = {c["id"]: k for k, c in enumerate(calls) if c["id"] is not None}
    found: dict[int, dict[str, Any]] = {}
    for p, n in enumerate(range(i + 1, end)):
        ref = messages[n].get("tool_call_id")
        k = (p if p < len(calls) else None) if ref is None else ids.get(ref)
        if k is None:
            raise ValueError(f"messages[{n}].tool_call_id: {ref!r} matches no tool call of messages[{i}]")
        if k in found:
            raise ValueError(f"messages[{n}].tool_call_id: a second result for tool call {k} of messages[{i}]")
        found[k] = _result(messages[n], n)
    return found, end


def to_internlm2(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
                 tool_choice: Any = None) -> list[dict[str, Any]]:
    """OpenAI chat `messages` (+ `tools`, `tool_choice`) as chat_format messages (see the module docstring).

    Raises ValueError naming the offending field (`messages[2].content[0]: ...`) on malformed input.
    """
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages: must be a non-empty list")
    tools_turn = _tools_turn(tools, tool_choice)
    out: list[dict[str, Any]] = []
    i = 0
    while i < len(messages):
        msg = messages[i]
        if not isinstance(msg, dict):
            raise ValueError(f"messages[{i}]: must be an object, got {type(msg).__name__}")
        role, where = msg.get("role"), f"messages[{i}].content"
        if role in ("system", "developer", "user"):
            out.append({"role": "user" if role == "user" else "system", "content": _text(msg.get("content"), where)})
        elif role == "tool":  # not right after an assistant's tool_calls: a result in place
            out.append(_result(msg, i))
        elif role == "assistant":
            content = _text(msg.get("content"), where, allow_none=True)
            calls = _calls(msg["tool_calls"], i) if msg.get("tool_calls") is not None else []
            results, end = _match(calls, messages, i)
            out.append({"role": "assistant", "content": content})
            for k, call in enumerate(calls):
                if k:
                    out.append({"role": "assistant", "content": ""})
                out[-1]["tool_call"] = {"name": call["name"], "parameters": call["parameters"]}
                if k in results:
                    out.append(results[k])
            i = end
            continue
        else:
            raise ValueError(f"messages[{i}].role: unknown role {role!r}; expected one of {', '.join(ROLES)}")
        i += 1
    if tools_turn is not None:
        lead = next((n for n, m in enumerate(out) if m["role"] != "system"), len(out))
        out.insert(lead, tools_turn)
    return out


def render_prompt(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
                  tool_choice: Any = None) -> str:
    """The InternLM2 prompt text (`<s>` ... `<|im_start|>assistant\\n`) of an OpenAI chat request."""
    return render_chat(to_internlm2(messages, tools, tool_choice), add_generation_prompt=True).text


def _parse_call(body: str) -> dict[str, Any] | None:
    """One plugin action's JSON as an OpenAI tool call, or None when it is not a well-formed call."""
    try:
        obj = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = obj["parameters"] if "parameters" in obj else obj.get("arguments")
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except (ValueError, RecursionError):
            return None
    args = {} if args is None else args
    if not isinstance(args, dict):  # OpenAI's arguments are a JSON object
        return None
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": obj["name"], "arguments": json.dumps(args, ensure_ascii=False)}}


def parse_tool_calls(text: str) -> tuple[str, list[dict[str, Any]]]:
    """`(content, tool_calls)` of a model output (see the module docstring); never raises.

    Without well-formed plugin calls: (the text less trailing `<|im_end|>`/`</s>`, []); with them, content
    is the text before the first action (maybe "").
    """
    while text.endswith(_TAIL_SPECIALS):
        text = text[:-len(next(s for s in _TAIL_SPECIALS if text.endswith(s)))]
    start = text.find("<|action_start|>")
    if start < 0:
        return text, []
    calls, pos = [], start
    for m in _ACTION.finditer(text, start):
        if text[pos:m.start()].strip() or m.group(1) != "<|plugin|>":
            return text, []
        call = _parse_call(m.group(2))
        if call is None:
            return text, []
        calls.append(call)
        pos = m.end()
    if not calls or text[pos:].strip():
        return text, []
    return text[:start], calls
