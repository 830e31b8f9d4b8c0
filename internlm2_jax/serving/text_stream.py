"""Token ids → text deltas for streaming, with OpenAI `stop` strings and held-back partial characters."""

from __future__ import annotations

from typing import Sequence

from internlm2_jax.tokenizer import Tokenizer

ACTION_START = "<|action_start|>"
CONTEXT_IDS = 6  # ids decoded before the new ones: SentencePiece drops a leading space at the start of a decode


class TextStream:
    """Accumulates generated ids and hands out the text that is safe to show.

    Held back: a trailing U+FFFD (a multi-byte character split across tokens), any tail that could start a
    `stop` string, and, when `tools` are on, everything from `<|action_start|>` (the tool call is parsed at
    the end, never streamed as content). `text` keeps the special tokens (the tool-call parser needs them);
    the shown content skips them.

    Each `push` decodes only the newest ids (with a few ids before them as context), as vLLM's incremental
    detokenizer does, so a long answer costs O(length), not O(length²); `finish` and `full_content` decode
    the whole output once, and tests/test_serving_text_stream.py checks the pieces add up to it.
    """

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = (), tools: bool = False,
                 end_ids: Sequence[int] = ()):
        self.tokenizer, self.stop, self.tools = tokenizer, tuple(s for s in stop if s), tools
        self.end_ids = set(int(i) for i in end_ids)  # stop ids: counted, never shown
        self.ids: list[int] = []
        self.shown = ""
        self.stopped = False  # a stop string was found: the caller cancels the request
        self._action = tokenizer.special_ids.get(ACTION_START) if tools else None
        self._visible: list[int] = []  # content ids: no end ids, nothing from <|action_start|> on
        self._closed = False  # <|action_start|> seen: the content ends there
        self._text = ""  # decoded content of `_visible[:_read]`
        self._prefix = self._read = 0  # `_visible[_prefix:_read]` is the context decoded again with new ids
        self._searched = 0  # stop strings cannot start before this offset of `_text` (already searched)

    @property
    def text(self) -> str:
        """The whole output with special tokens (the stop id excluded)."""
        return self.tokenizer.decode([t for t in self.ids if t not in self.end_ids])

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special=True)

    def _content(self) -> tuple[str, bool]:
        """`(content so far, final)`, decoded whole: the visible text, cut at a stop string."""
        ids = [t for t in self.ids if t not in self.end_ids]
        if self._action is not None and self._action in ids:
            ids = ids[:ids.index(self._action)]
        return self._cut(self._decode(ids))

    def _cut(self, plain: str, start: int = 0) -> tuple[str, bool]:
        hits = [i for i in (plain.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            return plain[:min(hits)], True
        return plain, False

    def push(self, token: int) -> str:
        """Adds one id; returns the newly showable text (possibly empty)."""
        token = int(token)
        self.ids.append(token)
        if token in self.end_ids or self._closed or self.stopped:
            return ""
        if token == self._action:
            self._closed = True
            return ""
        self._visible.append(token)
        before = self._decode(self._visible[self._prefix:self._read])
        now = self._decode(self._visible[self._prefix:])
        if now.endswith("\ufffd") or not now.startswith(before):
            return ""  # a character still incomplete: wait for the ids that finish it
        self._text += now[len(before):]
        self._read = len(self._visible)
        self._prefix = max(0, self._read - CONTEXT_IDS)
        longest = max(map(len, self.stop), default=0)
        content, self.stopped = self._cut(self._text, self._searched)
        self._searched = max(0, len(self._text) - longest + 1)
        if not self.stopped:
            hold = max((k for s in self.stop for k in range(1, len(s)) if content.endswith(s[:k])), default=0)
            content = content[:len(content) - hold] if hold else content
        return self._advance(content)

    def finish(self) -> str:
        """The rest of the content once generation ended (nothing is held back any more)."""
        content, _ = self._content()
        return self._advance(content)

    def _advance(self, content: str) -> str:
        if not content.startswith(self.shown):  # a held-back tail turned out different: never unsay text
            return ""
        delta, self.shown = content[len(self.shown):], content
        return delta

    def full_content(self) -> str:
        """All of the content (cut at a stop string), whatever was shown so far."""
        return self._content()[0]
