"""Sentencepiece tokenizer wrapper with InternLM2's chat specials and chat format."""

from __future__ import annotations

import json
import os
import re
from typing import Any, Iterable, Optional, Sequence

import numpy as np
import sentencepiece as spm

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


class Tokenizer:
    """InternLM2 tokenizer: sentencepiece for text, a hand-made table for the chat specials.

    `encode` splits the text on the special strings (`<s>`, `</s>`, `<|im_start|>`, ...) and maps
    each to its id, so chat markup in text becomes single tokens like the HF tokenizer does.
    """

    def __init__(self, model_path: str | os.PathLike, special_ids: Optional[dict[str, int]] = None):
        path = os.fspath(model_path)
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.model")
        if not os.path.exists(path):
            raise FileNotFoundError(f"sentencepiece model not found: {path}")
        self.path = path
        self.sp = spm.SentencePieceProcessor(model_file=path)
        self.special_ids = dict(special_ids) if special_ids is not None else self._find_special_ids()
        self.special_ids.setdefault("<s>", self.sp.bos_id())
        self.special_ids.setdefault("</s>", self.sp.eos_id())
        bad = {s: i for s, i in self.special_ids.items() if not 0 <= i < self.vocab_size}
        if bad:
            raise ValueError(f"special token ids outside the vocabulary ({self.vocab_size}): {bad}")
        self.id_to_special = {i: s for s, i in self.special_ids.items()}
        pattern = "|".join(re.escape(s) for s in sorted(self.special_ids, key=len, reverse=True))
        self._split_re = re.compile(f"({pattern})")

    def _find_special_ids(self) -> dict[str, int]:
        found = {s: self.sp.piece_to_id(s) for s in CHAT_SPECIALS}
        if all(i != self.sp.unk_id() for i in found.values()):
            return found
        if self.vocab_size == RELEASED_VOCAB_SIZE:
            return dict(RELEASED_SPECIAL_IDS)
        raise ValueError(
            f"tokenizer {self.path} has no pieces for the chat specials {CHAT_SPECIALS} and is not the "
            f"released {RELEASED_VOCAB_SIZE}-piece InternLM2 tokenizer; pass special_ids= explicitly"
        )

    # ---- basic properties ----------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def bos_id(self) -> int:
        return self.special_ids["<s>"]

    @property
    def eos_id(self) -> int:
        return self.special_ids["</s>"]

    @property
    def pad_id(self) -> int:
        """InternLM2 pads with `</s>`."""
        return self.eos_id

    @property
    def im_start_id(self) -> int:
        return self.special_ids["<|im_start|>"]

    @property
    def im_end_id(self) -> int:
        return self.special_ids["<|im_end|>"]

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Generation stops: `</s>` and `<|im_end|>`."""
        return (self.eos_id, self.im_end_id)

    def check_compatible(self, vocab_size: int) -> None:
        """Raises if this tokenizer cannot feed a model with `vocab_size` embedding rows."""
        if self.vocab_size > vocab_size:
            raise ValueError(
                f"tokenizer mismatch: {self.path} has {self.vocab_size} pieces but the model has only "
                f"{vocab_size} embedding rows"
            )

    # ---- text <-> ids --------------------------------------------------------------------------
    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False,
               allow_special: bool = True) -> list[int]:
        """Token ids of `text`; special strings become their ids when `allow_special`."""
        ids: list[int] = [self.bos_id] if add_bos else []
        parts = self._split_re.split(text) if allow_special else [text]
        for i, part in enumerate(parts):
            if not part:
                continue
            if allow_special and i % 2 == 1:
                ids.append(self.special_ids[part])
            else:
                ids.extend(self.sp.encode(part))
        if add_eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Iterable[int], *, skip_special: bool = False) -> str:
        """Text of `ids`; specials render as their strings unless `skip_special`."""
        out: list[str] = []
        run: list[int] = []
        for i in (int(t) for t in np.asarray(list(ids)).reshape(-1)):
            if i in self.id_to_special:
                out.append(self.sp.decode(run))
                run = []
                if not skip_special:
                    out.append(self.id_to_special[i])
            else:
                run.append(i)
        out.append(self.sp.decode(run))
        return "".join(out)

    # ---- chat format ---------------------------------------------------------------------------
    def encode_chat(self, messages: Sequence[dict[str, Any]], *, add_generation_prompt: bool = False) -> list[int]:
        """InternLM2 chat ids: `<s>` then `<|im_start|>{role}\\n{content}<|im_end|>\\n` per message."""
        return self.encode_chat_with_mask(messages, add_generation_prompt=add_generation_prompt)[0]

    def encode_chat_with_mask(
        self, messages: Sequence[dict[str, Any]], *, add_generation_prompt: bool = False
    ) -> tuple[list[int], list[bool]]:
        """Chat ids and a loss mask: True on assistant content and its `<|im_end|>` only."""
        ids, mask = [self.bos_id], [False]
        for n, msg in enumerate(messages):
            header, content = render_message(msg, index=n)
            is_assistant = msg["role"] == "assistant"
            h = [self.im_start_id] + self.encode(header + "\n")
            c = self.encode(content) + [self.im_end_id]
            nl = self.encode("\n")
            ids += h + c + nl
            mask += [False] * len(h) + [is_assistant] * len(c) + [False] * len(nl)
        if add_generation_prompt:
            g = [self.im_start_id] + self.encode("assistant\n")
            ids += g
            mask += [False] * len(g)
        return ids, mask


def render_message(msg: dict[str, Any], *, index: int = 0) -> tuple[str, str]:
    """`(header, content)` strings of one chat message in InternLM2's format.

    `msg`: `{"role": system|user|assistant|environment, "content": str, "name"?: plugin|interpreter,
    "tool_call"?: {"name": ..., "parameters": ...}}` (assistant tool calls render as
    `<|action_start|><|plugin|>\\n{json}<|action_end|>` after the content).
    """
    role = msg.get("role")
    if role not in CHAT_ROLES:
        raise ValueError(f"message {index}: unknown role {role!r}; expected one of {CHAT_ROLES}")
    content = msg.get("content") or ""
    if not isinstance(content, str):
        raise ValueError(f"message {index}: content must be a string, got {type(content).__name__}")
    header = role
    name = msg.get("name")
    if name is not None:
        if name not in TOOL_NAMES:
            raise ValueError(f"message {index}: unknown tool name {name!r}; expected one of {sorted(TOOL_NAMES)}")
        header = f"{role} name={TOOL_NAMES[name]}"
    call = msg.get("tool_call")
    if call is not None:
        if role != "assistant":
            raise ValueError(f"message {index}: only assistant turns may carry a tool_call")
        tool = TOOL_NAMES[call.get("type", "plugin")]
        body = call.get("code") if tool == "<|interpreter|>" else json.dumps(
            {"name": call["name"], "parameters": call.get("parameters", {})}, ensure_ascii=False)
        content = f"{content}<|action_start|>{tool}\n{body}<|action_end|>"
    return header, content
