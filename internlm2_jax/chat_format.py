"""InternLM2's chat format, rendered once as text with the character spans that carry the SFT loss.

The format is InternLM's `chat/chat_format.md` (the internlm2-chat `chat_template` for plain turns):

    <s><|im_start|>{role}[ name={name}]\\n{content}<|im_end|>\\n   per message
    <|im_start|>assistant\\n                                        generation prompt

Tool use (roles `system`, `user`, `assistant`, `environment`; `name` is `plugin` → `<|plugin|>`,
`interpreter` → `<|interpreter|>`, or a plain word such as `file`):

    assistant plugin call:       {content}<|action_start|><|plugin|>\\n{json}<|action_end|><|im_end|>\\n
    assistant interpreter call:  {content}<|action_start|><|interpreter|>\\n{code}<|action_end|>\\n<|im_end|>\\n

The interpreter call ends `<|action_end|>\\n`, the plugin call `<|action_end|>` (both as in chat_format.md;
LMDeploy's template renders plugin calls the same way, Lagent's protocol adds the `\\n` to plugin calls too).

Tokenizers encode the whole rendered text at once (split on the special strings, sentencepiece between,
like the HF slow tokenizer), so token ids equal the reference's; the loss mask comes from the character
spans: a token is trained when it overlaps an assistant turn's content-through-`<|im_end|>` span
(XTuner's rule; a token merging the header's `\\n` with a leading `\\n` of the content counts as content).
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any, Sequence

CHAT_SPECIALS = (
    "<|plugin|>", "<|interpreter|>", "<|action_end|>", "<|action_start|>", "<|im_end|>", "<|im_start|>",
)
# Ids of the chat specials in the released 92544-piece InternLM2 tokenizer (they occupy spare slots,
# so raw sentencepiece never produces them from text).
RELEASED_SPECIAL_IDS = {
    "<|plugin|>": 92538, "<|interpreter|>": 92539, "<|action_end|>": 92540,
    "<|action_start|>": 92541, "<|im_end|>": 92542, "<|im_start|>": 92543,
}
RELEASED_VOCAB_SIZE = 92544
REWARD_TOKEN_ID = 92527  # InternLM2-Reward reads its score here.
CHAT_ROLES = ("system", "user", "assistant", "environment")
TOOL_NAMES = {"plugin": "<|plugin|>", "interpreter": "<|interpreter|>"}
TRAIN_ON = ("all", "last", "none")
_PLAIN_NAME = re.compile(r"^[\w.\-]+$")

Message = dict[str, Any]
Span = tuple[int, int]


@dataclasses.dataclass(frozen=True)
class RenderedChat:
    """A conversation as text plus the `[start, end)` character spans that carry the loss."""

    text: str
    trained: tuple[Span, ...]


def header_name(name: Any, index: int) -> str:
    """The header's `name=` value: the tool special for plugin/interpreter, else the plain word."""
    if name in TOOL_NAMES:
        return TOOL_NAMES[name]
    if not isinstance(name, str) or not _PLAIN_NAME.match(name):
        raise ValueError(f"message {index}: bad name {name!r}; expected plugin, interpreter or a plain word")
    return name


def render_tool_call(call: dict[str, Any], index: int) -> str:
    """`<|action_start|>...<|action_end|>` text of an assistant tool call (see the module docstring)."""
    kind = call.get("type", "plugin")
    if kind == "interpreter":
        code = call.get("code")
        if not isinstance(code, str):
            raise ValueError(f"message {index}: an interpreter tool_call needs a string 'code'")
        return f"<|action_start|><|interpreter|>\n{code}<|action_end|>\n"
    if kind != "plugin":
        raise ValueError(f"message {index}: unknown tool_call type {kind!r}; expected plugin or interpreter")
    if not isinstance(call.get("name"), str):
        raise ValueError(f"message {index}: a plugin tool_call needs a string 'name'")
    body = json.dumps({"name": call["name"], "parameters": call.get("parameters", {})}, ensure_ascii=False)
    return f"<|action_start|><|plugin|>\n{body}<|action_end|>"


def render_message(msg: Message, *, index: int = 0) -> tuple[str, str]:
    """`(header, body)` of one message: header `role[ name=...]`, body content plus any tool call.

    `msg`: `{"role": system|user|assistant|environment, "content": str, "name"?: plugin|interpreter|word,
    "tool_call"?: {"name", "parameters"} or {"type": "interpreter", "code"}}`.
    """
    if not isinstance(msg, dict):
        raise ValueError(f"message {index}: expected a dict, got {type(msg).__name__}")
    role = msg.get("role")
    if role not in CHAT_ROLES:
        raise ValueError(f"message {index}: unknown role {role!r}; expected one of {CHAT_ROLES}")
    content = msg.get("content")
    content = "" if content is None else content
    if not isinstance(content, str):
        raise ValueError(f"message {index}: content must be a string, got {type(content).__name__}")
    header = role if msg.get("name") is None else f"{role} name={header_name(msg['name'], index)}"
    call = msg.get("tool_call")
    if call is not None:
        if role != "assistant":
            raise ValueError(f"message {index}: only assistant turns may carry a tool_call")
        content += render_tool_call(call, index)
    return header, content


def render_chat(messages: Sequence[Message], *, add_generation_prompt: bool = False, bos: str = "<s>",
                train_on: str = "all") -> RenderedChat:
    """The conversation's text and trained spans.

    `train_on`: `"all"` assistant turns, only the `"last"` one (earlier turns become context), or `"none"`.
    """
    if train_on not in TRAIN_ON:
        raise ValueError(f"train_on must be one of {TRAIN_ON}, got {train_on!r}")
    last = max((i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "assistant"),
               default=-1)
    parts, trained, pos = [bos], [], len(bos)
    for n, msg in enumerate(messages):
        header, body = render_message(msg, index=n)
        head = f"<|im_start|>{header}\n"
        turn = head + body + "<|im_end|>"
        if msg["role"] == "assistant" and (train_on == "all" or (train_on == "last" and n == last)):
            trained.append((pos + len(head), pos + len(turn)))
        parts.append(turn + "\n")
        pos += len(turn) + 1
    if add_generation_prompt:
        parts.append("<|im_start|>assistant\n")
    return RenderedChat("".join(parts), tuple(trained))


def mask_from_offsets(offsets: Sequence[Span], trained: Sequence[Span]) -> list[bool]:
    """Per-token loss mask: True when the token's character span overlaps a trained span.

    `offsets` are in text order (as tokenizers return them), `trained` sorted and disjoint. A zero-width
    span (a leading byte-fallback piece of a multi-byte character) counts as the character it starts.
    """
    mask, j = [], 0
    for begin, end in offsets:
        end = max(end, begin + 1)
        while j < len(trained) and trained[j][1] <= begin:
            j += 1
        mask.append(j < len(trained) and trained[j][0] < end)
    return mask
