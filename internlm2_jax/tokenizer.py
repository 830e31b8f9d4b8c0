"""Sentencepiece tokenizer wrapper with InternLM2's chat specials and chat format."""

from __future__ import annotations

import json
import os
import re
from typing import Any, Iterable, Optional, Sequence

import numpy as np
import sentencepiece as spm

from internlm2_jax.chat_format import (  # noqa: F401  (re-exported: the tokenizer's public constants)
    CHAT_ROLES,
    CHAT_SPECIALS,
    RELEASED_SPECIAL_IDS,
    RELEASED_VOCAB_SIZE,
    REWARD_TOKEN_ID,
    TOOL_NAMES,
    Message,
    Span,
    mask_from_offsets,
    render_chat,
)

HF_TOKENIZER_CONFIG = "tokenizer_config.json"


class Tokenizer:
    """InternLM2 tokenizer: sentencepiece for text, a table for the added (special) tokens.

    Like the HF slow tokenizer, `encode` splits the text on the added tokens' strings (`<unk>`, `<s>`,
    `</s>`, `<|im_start|>`, ...), maps each to its id and sentencepieces the text between them. The
    table comes from `special_ids=`, else from `tokenizer_config.json`'s `added_tokens_decoder` beside
    the model, else from the model's own pieces (tokenizers trained here), else the released ids.
    """

    def __init__(self, model_path: str | os.PathLike, special_ids: Optional[dict[str, int]] = None):
        path = os.fspath(model_path)
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.model")
        if not os.path.exists(path):
            raise FileNotFoundError(f"sentencepiece model not found: {path}")
        self.path = path
        try:
            self.sp = spm.SentencePieceProcessor(model_file=path)
        except (RuntimeError, OSError) as e:
            raise ValueError(f"{path}: not a sentencepiece model ({e})") from None
        self.hf_config = _read_hf_config(os.path.join(os.path.dirname(path), HF_TOKENIZER_CONFIG))
        if special_ids is not None:
            self.special_ids = dict(special_ids)
        elif self.hf_config is not None and self.hf_config.get("added_tokens_decoder"):
            self.special_ids = {t["content"]: int(i) for i, t in self.hf_config["added_tokens_decoder"].items()}
        else:
            self.special_ids = self._find_special_ids()
        for text, i in (("<unk>", self.sp.unk_id()), ("<s>", self.sp.bos_id()), ("</s>", self.sp.eos_id())):
            if i >= 0:
                self.special_ids.setdefault(text, i)
        bad = {s: i for s, i in self.special_ids.items() if not 0 <= i < self.vocab_size}
        if bad:
            raise ValueError(f"special token ids outside the vocabulary ({self.vocab_size}): {bad}")
        missing = [s for s in ("<s>", "</s>", "<|im_start|>", "<|im_end|>") if s not in self.special_ids]
        if missing:
            raise ValueError(f"tokenizer {self.path}: no id for {missing}")
        self.id_to_special = {i: s for s, i in self.special_ids.items()}
        pattern = "|".join(re.escape(s) for s in sorted(self.special_ids, key=len, reverse=True))
        self._split_re = re.compile(pattern)
        self._prefix_cache: dict[str, list[int]] = {}

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
    def _segments(self, text: str, allow_special: bool) -> Iterable[tuple[int, str, bool]]:
        """`(start, piece, is_special)` runs of `text` split on the special strings."""
        pos = 0
        if allow_special:
            for m in self._split_re.finditer(text):
                if m.start() > pos:
                    yield pos, text[pos:m.start()], False
                yield m.start(), m.group(), True
                pos = m.end()
        if pos < len(text):
            yield pos, text[pos:], False

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False,
               allow_special: bool = True) -> list[int]:
        """Token ids of `text`; special strings become their ids when `allow_special`."""
        ids: list[int] = [self.bos_id] if add_bos else []
        for _, part, special in self._segments(text, allow_special):
            if special:
                ids.append(self.special_ids[part])
            else:
                ids.extend(self.sp.encode(part))
        if add_eos:
            ids.append(self.eos_id)
        return ids

    def encode_with_offsets(self, text: str, *, allow_special: bool = True) -> tuple[list[int], list[Span]]:
        """`encode(text)` plus each token's `[start, end)` character span in `text` (the leading
        byte-fallback pieces of a multi-byte character have zero-width spans at its start)."""
        ids: list[int] = []
        spans: list[Span] = []
        for start, part, special in self._segments(text, allow_special):
            if special:
                ids.append(self.special_ids[part])
                spans.append((start, start + len(part)))
                continue
            for piece in self.sp.encode(part, out_type="immutable_proto").pieces:
                ids.append(piece.id)
                spans.append((start + piece.begin, start + piece.end))
        return ids, spans

    def decode(self, ids: Iterable[int], *, skip_special: bool = False) -> str:
        """Text of `ids`; added tokens render as their strings unless `skip_special`."""
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
    def encode_chat(self, messages: Sequence[Message], *, add_generation_prompt: bool = False) -> list[int]:
        """InternLM2 chat ids (see `internlm2_jax.chat_format`): the rendered conversation, encoded whole."""
        return self.encode_chat_with_mask(messages, add_generation_prompt=add_generation_prompt)[0]

    def encode_chat_with_mask(self, messages: Sequence[Message], *, add_generation_prompt: bool = False,
                              train_on: str = "all") -> tuple[list[int], list[bool]]:
        """Chat ids and a loss mask: True on assistant content (tool calls included) and its `<|im_end|>`.

        `train_on="last"` keeps the loss on the final assistant turn only.
        """
        chat = render_chat(messages, add_generation_prompt=add_generation_prompt, train_on=train_on)
        trained = chat.trained
        bounds = {b for span in trained for b in span}
        ids: list[int] = []
        mask: list[bool] = []
        # Trained spans start and end at segment boundaries except where an assistant content starts inside
        # "assistant\n{content}". There, when the segment's ids begin with the header's own ids, no token
        # crosses the boundary; otherwise (a merge such as "\n" + "\n") per-token offsets decide.
        for start, part, special in self._segments(chat.text, True):
            end = start + len(part)
            part_ids = [self.special_ids[part]] if special else self.sp.encode(part)
            inner = [b for b in bounds if start < b < end]
            if not inner:
                inside = any(a <= start < b for a, b in trained)
                ids.extend(part_ids)
                mask.extend([inside] * len(part_ids))
                continue
            head = self._prefix_ids(part[:inner[0] - start]) if len(inner) == 1 else None
            if head is not None and part_ids[:len(head)] == head:
                ids.extend(part_ids)
                mask.extend([False] * len(head) + [True] * (len(part_ids) - len(head)))
                continue
            pieces = self.sp.encode(part, out_type="immutable_proto").pieces
            ids.extend(p.id for p in pieces)
            mask.extend(mask_from_offsets([(start + p.begin, start + p.end) for p in pieces], trained))
        return ids, mask

    def _prefix_ids(self, text: str) -> list[int]:
        """Ids of a turn header such as `assistant` + newline (cached: a handful of distinct headers)."""
        if text not in self._prefix_cache:
            self._prefix_cache[text] = self.sp.encode(text)
        return self._prefix_cache[text]


def _read_hf_config(path: str) -> Optional[dict[str, Any]]:
    """`tokenizer_config.json` as a dict, None when absent; a broken file is an error naming it."""
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
        added = config.get("added_tokens_decoder") or {}
        bad = [i for i, token in added.items() if not (str(i).isdigit() and isinstance(token["content"], str))]
        if bad:
            raise ValueError(f"id {bad[0]!r} or its content is not valid")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: bad added_tokens_decoder entry ({type(e).__name__}: {e})") from None
    return config
