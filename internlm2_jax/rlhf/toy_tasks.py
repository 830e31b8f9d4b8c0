"""Tiny CPU tasks for the RLHF tests and demos: a character tokenizer, rule-labelled preference pairs,
and programmatic rewards."""

from __future__ import annotations

import random
from typing import Any, Sequence

import numpy as np

from internlm2_jax.chat_format import mask_from_offsets, render_chat

_SPECIALS = ("<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<|reward|>")
_CHARS = "\n" + "".join(chr(c) for c in range(32, 127))
_JUNK = "".join(c for c in _CHARS[1:] if c not in "ab")


class CharTokenizer:
    """One id per printable ASCII character plus the chat specials; `encode_chat` mirrors InternLM2's
    template (`<s>` then `<|im_start|>{role}\\n{content}<|im_end|>\\n` per message)."""

    pad_id, bos_id, eos_id, im_start_id, im_end_id, reward_id = range(6)

    def __init__(self) -> None:
        self._ids = {c: i + len(_SPECIALS) for i, c in enumerate(_CHARS)}
        self._chars = {i: c for c, i in self._ids.items()}

    @property
    def vocab_size(self) -> int:
        return len(_SPECIALS) + len(_CHARS)

    @property
    def stop_ids(self) -> tuple[int, ...]:
        return (self.eos_id, self.im_end_id)

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids and character spans; the chat specials are single tokens, unknown characters dropped."""
        ids, spans, pos = [], [], 0
        while pos < len(text):
            special = next((s for s in _SPECIALS if text.startswith(s, pos)), None)
            if special is not None:
                ids.append(_SPECIALS.index(special))
                spans.append((pos, pos + len(special)))
                pos += len(special)
                continue
            if text[pos] in self._ids:
                ids.append(self._ids[text[pos]])
                spans.append((pos, pos + 1))
            pos += 1
        return ids, spans

    def encode(self, text: str) -> list[int]:
        return self.encode_with_offsets(text)[0]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self._chars.get(int(i), _SPECIALS[int(i)] if int(i) < len(_SPECIALS) else "?") for i in ids)

    def encode_chat_with_mask(self, messages: Sequence[dict[str, Any]], *, add_generation_prompt: bool = False,
                              train_on: str = "all") -> tuple[list[int], list[bool]]:
        chat = render_chat(messages, add_generation_prompt=add_generation_prompt, train_on=train_on)
        ids, spans = self.encode_with_offsets(chat.text)
        return ids, mask_from_offsets(spans, chat.trained)

    def encode_chat(self, messages: Sequence[dict[str, Any]], *, add_generation_prompt: bool = False) -> list[int]:
        return self.encode_chat_with_mask(messages, add_generation_prompt=add_generation_prompt)[0]


# Condition → system prompt of the toy conditional RM: each prefers a different letter.
TOY_CONDITIONS = {"likes_a": "a", "likes_b": "b"}


def _mix(rng: random.Random, frac_a: float, n: int) -> str:
    return "".join("a" if rng.random() < frac_a else "b" for _ in range(n))


def _frac_a(s: str) -> float:
    return s.count("a") / max(len(s), 1)


def _junk_pair(rng: random.Random, letter: str, min_len: int, max_len: int) -> tuple[str, str]:
    """(chosen, rejected): random printable characters, and the same with about half of them `letter`."""
    junk = "".join(rng.choice(_JUNK) for _ in range(rng.randint(min_len, max_len)))
    chosen = "".join(letter if rng.random() < 0.5 else c for c in junk)
    return (chosen if chosen != junk else letter + junk[1:]), junk


def toy_preference_records(n: int, seed: int = 0, *, min_len: int = 4, max_len: int = 10,
                           junk_fraction: float = 0.0) -> list[dict[str, Any]]:
    """Pairs of a/b strings with clearly different letter fractions; condition `likes_a` prefers more
    'a', `likes_b` more 'b'. The same two responses appear under both conditions with flipped labels.

    A `junk_fraction` of the pairs instead contrasts random printable text with the same text partly
    rewritten to the preferred letter, so the RM also ranks the arbitrary strings a fresh policy emits
    (without them its score can be flat there and PPO against it has nothing to climb).
    """
    rng = random.Random(seed)
    out = []
    for i in range(n):
        cond = "likes_a" if i % 2 == 0 else "likes_b"
        if rng.random() < junk_fraction:
            chosen, rejected = _junk_pair(rng, TOY_CONDITIONS[cond], min_len, max_len)
            out.append({"prompt": "say", "chosen": chosen, "rejected": rejected, "condition": cond})
            continue
        while True:  # resample until the rule's label is unambiguous
            mostly_a = _mix(rng, 0.85, rng.randint(min_len, max_len))
            mostly_b = _mix(rng, 0.15, rng.randint(min_len, max_len))
            if _frac_a(mostly_a) - _frac_a(mostly_b) >= 0.4:
                break
        chosen, rejected = (mostly_a, mostly_b) if cond == "likes_a" else (mostly_b, mostly_a)
        out.append({"prompt": "say", "chosen": chosen, "rejected": rejected, "condition": cond})
    return out


def target_token_reward(responses: Sequence[Sequence[int]], target: int) -> np.ndarray:
    """Fraction of response tokens equal to `target` → `[B]` (0 for empty responses)."""
    return np.array([sum(t == target for t in r) / max(len(r), 1) for r in responses], np.float32)


def toy_prompts(n: int, tok: CharTokenizer, seed: int = 0) -> list[dict[str, Any]]:
    """Short arithmetic-flavoured prompts with a category each: `{"messages", "category"}`."""
    rng = random.Random(seed)
    cats = list(TOY_CONDITIONS)
    return [{"messages": [{"role": "user", "content": f"{rng.randint(0, 9)}+{rng.randint(0, 9)}"}],
             "category": cats[i % len(cats)]} for i in range(n)]


def _toy_pretrain_batch(tok: CharTokenizer, batch: int, seq_len: int, seed: int, index: int) -> dict[str, np.ndarray]:
    rng = random.Random(seed * 1_000_003 + index)
    rows = np.zeros((batch, seq_len), np.int32)
    mask = np.zeros((batch, seq_len), np.float32)
    for i in range(batch):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        ids = tok.encode_chat([{"role": "user", "content": f"{a}+{b}"},
                               {"role": "assistant", "content": str(a + b)}])[:seq_len]
        rows[i, : len(ids)], mask[i, : len(ids)] = ids, 1.0
    return {"tokens": rows, "loss_mask": mask}


def toy_pretrain_batches(tok: CharTokenizer, batch: int, seq_len: int, seed: int = 0) -> Any:
    """Endless, checkpointable (grain) iterator of `{"tokens", "loss_mask": [batch, seq_len]}` batches of
    chat-formatted 'a+b=c' examples (the toy ptx data); batch i depends only on (seed, i)."""
    import grain

    return iter(grain.MapDataset.range(1 << 40).map(
        lambda i: _toy_pretrain_batch(tok, batch, seq_len, seed, int(i))))
