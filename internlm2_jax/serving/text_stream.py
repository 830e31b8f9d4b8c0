"""Token ids → text deltas for streaming, with OpenAI `stop` strings and held-back partial characters."""

from __future__ import annotations

from typing import Sequence

from internlm2_jax.tokenizer import Tokenizer

ACTION_START = "<|action_start|>"


class TextStream:
    """Accumulates generated ids and hands out the text that is safe to show.

    Held back: a trailing U+FFFD (a multi-byte character split across tokens), any tail that could start a
    `stop` string, and, when `tools` are on, everything from `<|action_start|>` (the tool call is parsed at
    the end, never streamed as content). `text` keeps the special tokens (the tool-call parser needs them);
    the shown content skips them.
    """

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = (), tools: bool = False,
                 end_ids: Sequence[int] = ()):
        self.tokenizer, self.stop, self.tools = tokenizer, tuple(s for s in stop if s), tools
        self.end_ids = set(int(i) for i in end_ids)  # stop ids: counted, never shown
        self.ids: list[int] = []
        self.shown = ""
        self.stopped = False  # a stop string was found: the caller cancels the request

    @property
    def text(self) -> str:
        """The whole output with special tokens (the stop id excluded)."""
        return self.tokenizer.decode([t for t in self.ids if t not in self.end_ids])

    def _content(self) -> tuple[str, bool]:
        """`(content so far, final)`: the visible text, cut at a stop string when one appeared."""
        ids = [t for t in self.ids if t not in self.end_ids]
        action = self.tokenizer.special_ids.get(ACTION_START)
        if self.tools and action in ids:
            ids = ids[:ids.index(action)]
        plain = self.tokenizer.decode(ids, skip_special=True)
        hits = [plain.index(s) for s in self.stop if s in plain]
        if hits:
            return plain[:min(hits)], True
        return plain, False

    def push(self, token: int) -> str:
        """Adds one id; returns the newly showable text (possibly empty)."""
        self.ids.append(int(token))
        content, self.stopped = self._content()
        if not self.stopped:
            hold = max((k for s in self.stop for k in range(1, len(s)) if content.endswith(s[:k])), default=0)
            content = content[:len(content) - hold] if hold else content
            if content.endswith("\ufffd"):
                content = content.rstrip("\ufffd")
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
