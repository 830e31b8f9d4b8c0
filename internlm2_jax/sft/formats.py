"""SFT conversation loading: OpenAI `messages`, Alpaca, ShareGPT and raw InternLM2 ChatML → our messages.

Our message dict (what `Tokenizer.encode_chat_with_mask` renders): `{"role": system|user|assistant|
environment, "content": str, "name"?: "plugin"|"interpreter", "tool_call"?: {"name", "parameters"} or
{"type": "interpreter", "code"}}`.

Mapping rules:
  * OpenAI: assistant `tool_calls` (exactly one per turn; InternLM2 renders one action per turn) →
    `tool_call` with parsed JSON `arguments` as `parameters`; `tool` / `function` role → `environment`,
    `name="plugin"`; a top-level `tools` list → a `system name=<|plugin|>` turn holding the JSON list of the
    functions, placed after the leading system turn (if any). Content given as a list of parts is joined.
  * Alpaca: `instruction` + (blank line + `input` if non-empty) → user, `output` → assistant, optional
    `system`.
  * ShareGPT: `conversations` of `{from, value}`: human/user → user, gpt/assistant → assistant, system,
    tool/observation/function_response → environment (plugin), function_call (JSON `{name, arguments}`) →
    assistant tool call; optional top-level `system` and `tools`.
  * ChatML: `<|im_start|>{role}[ name=<|plugin|>|<|interpreter|>|word]\\n{content}<|im_end|>` blocks (a
    leading `<s>` and whitespace between blocks are allowed); a trailing
    `<|action_start|><|plugin|>\\n{json}<|action_end|>` (or `<|interpreter|>` code, `<|action_end|>\\n`) in an
    assistant turn becomes a `tool_call` again (`internlm2_jax.chat_format` renders it back identically).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Optional, Sequence

from internlm2_jax.chat_format import CHAT_ROLES, TOOL_NAMES, header_name
from internlm2_jax.errors import ConfigValueError, InputDataError
from internlm2_jax.jsonl import read_jsonl_records
from internlm2_jax.tokenizer import Tokenizer

Message = dict[str, Any]
FORMATS = ("openai", "alpaca", "sharegpt", "chatml")


class FormatError(InputDataError):
    """A conversation record that cannot be converted (message names the file and line when known)."""


# ---- per-format converters -------------------------------------------------------------------------

def _text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts
        return "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in content)
    raise FormatError(f"content must be a string or a list of parts, got {type(content).__name__}")


def _args(arguments: Any) -> Any:
    if isinstance(arguments, str):
        try:
            return json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as e:
            raise FormatError(f"tool call arguments are not valid JSON: {e}") from None
    return {} if arguments is None else arguments


def _tools_turn(tools: Sequence[Any]) -> Message:
    funcs = [t.get("function", t) if isinstance(t, dict) else t for t in tools]
    return {"role": "system", "name": "plugin", "content": json.dumps(funcs, ensure_ascii=False)}


def _insert_tools(messages: list[Message], tools: Optional[Sequence[Any]]) -> list[Message]:
    if not tools:
        return messages
    at = 1 if messages and messages[0]["role"] == "system" and "name" not in messages[0] else 0
    return messages[:at] + [_tools_turn(tools)] + messages[at:]


def from_openai(record: dict[str, Any]) -> list[Message]:
    """OpenAI chat record `{"messages": [...], "tools"?: [...]}` → messages."""
    out: list[Message] = []
    for i, m in enumerate(record["messages"]):
        if not isinstance(m, dict):
            raise FormatError(f"message {i} is not an object")
        role = m.get("role")
        content = _text(m.get("content"))
        if role in ("tool", "function"):
            out.append({"role": "environment", "name": "plugin", "content": content})
        elif role == "assistant" and (m.get("tool_calls") or m.get("function_call")):
            calls = m.get("tool_calls") or [{"function": m["function_call"]}]
            if len(calls) != 1:
                raise FormatError(f"message {i}: {len(calls)} tool_calls in one turn; InternLM2 renders one")
            fn = calls[0].get("function", calls[0])
            out.append({"role": "assistant", "content": content,
                        "tool_call": {"name": fn["name"], "parameters": _args(fn.get("arguments"))}})
        else:
            out.append({"role": role, "content": content})
    return _insert_tools(out, record.get("tools"))


def from_alpaca(record: dict[str, Any]) -> list[Message]:
    """Alpaca record `{"instruction", "input"?, "output", "system"?}` → system?/user/assistant."""
    prompt = _text(record["instruction"])
    extra = _text(record.get("input"))
    if extra.strip():
        prompt = f"{prompt}\n\n{extra}"
    out = [{"role": "system", "content": _text(record["system"])}] if record.get("system") else []
    return out + [{"role": "user", "content": prompt}, {"role": "assistant", "content": _text(record["output"])}]


_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "chatgpt": "assistant", "system": "system", "tool": "environment", "observation": "environment",
                   "function_response": "environment"}


def from_sharegpt(record: dict[str, Any]) -> list[Message]:
    """ShareGPT record `{"conversations": [{"from", "value"}], "system"?, "tools"?}` → messages."""
    out: list[Message] = [{"role": "system", "content": _text(record["system"])}] if record.get("system") else []
    for i, turn in enumerate(record["conversations"]):
        src = turn.get("from") if isinstance(turn, dict) else None
        value = _text(turn.get("value")) if isinstance(turn, dict) else ""
        if src == "function_call":
            try:
                call = json.loads(value)
            except json.JSONDecodeError as e:
                raise FormatError(f"turn {i}: function_call value is not JSON: {e}") from None
            out.append({"role": "assistant", "content": "",
                        "tool_call": {"name": call["name"], "parameters": _args(call.get("arguments"))}})
        elif src in _SHAREGPT_ROLES:
            role = _SHAREGPT_ROLES[src]
            out.append({"role": role, "content": value, **({"name": "plugin"} if role == "environment" else {})})
        else:
            raise FormatError(f"turn {i}: unknown ShareGPT speaker {src!r}; expected one of "
                              f"{sorted(_SHAREGPT_ROLES) + ['function_call']}")
    tools = record.get("tools")
    if isinstance(tools, str):
        tools = json.loads(tools)
    return _insert_tools(out, tools)


_BLOCK = re.compile(r"<\|im_start\|>(.*?)\n(.*?)<\|im_end\|>", re.S)
_HEADER = re.compile(r"^(\w+)(?: name=(<\|plugin\|>|<\|interpreter\|>|[\w.\-]+))?$")
_ACTION = re.compile(r"<\|action_start\|>(<\|plugin\|>|<\|interpreter\|>)\n(.*)<\|action_end\|>\n?$", re.S)
_TOOL_BY_TOKEN = {v: k for k, v in TOOL_NAMES.items()}


def parse_chatml(text: str) -> list[Message]:
    """Raw InternLM2 ChatML text → messages (inverse of `Tokenizer.encode_chat` rendering)."""
    out: list[Message] = []
    pos = 0
    text = text[3:] if text.startswith("<s>") else text
    for m in _BLOCK.finditer(text):
        if text[pos:m.start()].strip():
            raise FormatError(f"text outside <|im_start|>...<|im_end|> blocks: {text[pos:m.start()][:40]!r}")
        pos = m.end()
        header = _HEADER.match(m.group(1).strip())
        if header is None:
            raise FormatError(f"bad ChatML header {m.group(1)!r}")
        msg: Message = {"role": header.group(1), "content": m.group(2)}
        if header.group(2):
            msg["name"] = _TOOL_BY_TOKEN.get(header.group(2), header.group(2))
        action = _ACTION.search(msg["content"]) if msg["role"] == "assistant" else None
        if action:
            msg["content"] = msg["content"][: action.start()]
            body = action.group(2)
            if action.group(1) == "<|interpreter|>":
                msg["tool_call"] = {"type": "interpreter", "code": body}
            else:
                try:
                    call = json.loads(body)
                except json.JSONDecodeError as e:
                    raise FormatError(f"plugin action is not JSON: {e}") from None
                msg["tool_call"] = {"name": call["name"], "parameters": call.get("parameters", {})}
        out.append(msg)
    if text[pos:].strip():
        raise FormatError(f"text outside <|im_start|>...<|im_end|> blocks: {text[pos:][:40]!r}")
    return out


# ---- detection, validation, loading ----------------------------------------------------------------

def detect_format(record: Any) -> str:
    """Which of `FORMATS` a record (parsed JSON value) is in."""
    if isinstance(record, str):
        return "chatml"
    if isinstance(record, dict):
        if "messages" in record:
            return "openai"
        if "conversations" in record:
            return "sharegpt"
        if "instruction" in record and "output" in record:
            return "alpaca"
        if isinstance(record.get("text"), str) and "<|im_start|>" in record["text"]:
            return "chatml"
    raise FormatError("cannot detect the conversation format (expected keys messages / conversations / "
                      "instruction+output / text with <|im_start|>)")


def validate_messages(messages: Sequence[Message]) -> None:
    """Raises `FormatError` on unknown roles, non-string content, empty assistant turns or no assistant turn."""
    if not messages:
        raise FormatError("empty conversation")
    for i, m in enumerate(messages):
        if m.get("role") not in CHAT_ROLES:
            raise FormatError(f"message {i}: unknown role {m.get('role')!r}; expected one of {CHAT_ROLES}")
        if not isinstance(m.get("content", ""), str):
            raise FormatError(f"message {i}: content must be a string")
        if m.get("name") is not None:
            try:
                header_name(m["name"], i)
            except ValueError as e:
                raise FormatError(str(e)) from None
        if m["role"] == "assistant" and not (m.get("content") or "").strip() and not m.get("tool_call"):
            raise FormatError(f"message {i}: empty assistant turn")
    if not any(m["role"] == "assistant" for m in messages):
        raise FormatError("conversation has no assistant turn (nothing to train on)")


def to_messages(record: Any, fmt: str = "auto") -> list[Message]:
    """Converts one record (parsed JSON value or ChatML string) and validates the result."""
    fmt = detect_format(record) if fmt == "auto" else fmt
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected 'auto' or one of {FORMATS}")
    try:
        if fmt == "chatml":
            messages = parse_chatml(record if isinstance(record, str) else record["text"])
        else:
            messages = {"openai": from_openai, "alpaca": from_alpaca, "sharegpt": from_sharegpt}[fmt](record)
    except (KeyError, TypeError, AttributeError) as e:
        raise FormatError(f"malformed {fmt} record: {type(e).__name__}: {e}") from None
    validate_messages(messages)
    return messages


@dataclasses.dataclass
class LoadResult:
    """Conversations loaded from a file plus the records skipped with `on_error="skip"`."""

    conversations: list[list[Message]]
    skipped: int = 0
    errors: list[str] = dataclasses.field(default_factory=list)


def load_conversations(path: str | os.PathLike, fmt: str = "auto", *, on_error: str = "raise") -> LoadResult:
    """Reads a JSONL file (one record per line; blank lines ignored) into validated message lists.

    `on_error="raise"` raises `FormatError("{path}:{line}: ...")` on the first bad record (bad JSON,
    unknown role, empty assistant turn, ...); `"skip"` counts it in `skipped` and keeps its message.
    A file without one usable conversation is an `EmptyDatasetError` (see `internlm2_jax.jsonl`).
    """
    if fmt != "auto" and fmt not in FORMATS:  # a config error, not one per line
        raise ConfigValueError(f"data format {fmt!r}: expected 'auto' or one of {FORMATS}")
    recs = read_jsonl_records(path, lambda record: to_messages(record, fmt), on_error, what="conversation",
                              error=FormatError)
    return LoadResult(list(recs), recs.skipped, recs.errors)


# ---- tokenization and debugging --------------------------------------------------------------------

def tokenize_conversation(tokenizer: Tokenizer, messages: Sequence[Message], *,
                          last_turn_only: bool = False) -> tuple[list[int], list[bool]]:
    """`(ids, mask)` of a conversation; mask True on assistant content + `<|im_end|>` (XTuner's rule).

    `last_turn_only` keeps the loss on the final assistant turn only (earlier turns become context).
    """
    return tokenizer.encode_chat_with_mask(messages, train_on="last" if last_turn_only else "all")


def render_mask(tokenizer: Tokenizer, ids: Sequence[int], mask: Sequence[bool], *, color: bool = False) -> str:
    """Decoded text with the trained spans wrapped in `[[...]]` (or green ANSI color when `color`)."""
    if len(ids) != len(mask):
        raise ValueError(f"ids ({len(ids)}) and mask ({len(mask)}) lengths differ")
    open_, close = ("\x1b[32m", "\x1b[0m") if color else ("[[", "]]")
    out, start = [], 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or bool(mask[i]) != bool(mask[start]):
            text = tokenizer.decode(ids[start:i])
            out.append(f"{open_}{text}{close}" if mask[start] else text)
            start = i
    return "".join(out)


def load_sft_examples(path: str | os.PathLike, tokenizer: Tokenizer, fmt: str = "auto", *, on_error: str = "raise",
                      last_turn_only: bool = False) -> tuple[list[tuple[list[int], list[bool]]], LoadResult]:
    """`load_conversations` + `tokenize_conversation`: `([(ids, mask), ...], load_result)` ready for packing."""
    result = load_conversations(path, fmt, on_error=on_error)
    examples = [tokenize_conversation(tokenizer, m, last_turn_only=last_turn_only) for m in result.conversations]
    return examples, result
