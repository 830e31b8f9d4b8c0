"""Needle-in-a-haystack: a secret-number sentence hidden at a depth of a long filler context.

The haystack is assembled at the token level: filler sentences are tokenized one by one (each as
`" " + sentence`) and concatenated until the prompt reaches the context-length budget, and the
needle's ids are spliced in at the sentence boundary closest to `depth * haystack_tokens`. So the
prompt length is exact (`<= context_length`) and the needle position is known to the token.
The frame around the haystack is InternLM2's chat format (`render_chat` split at the haystack)
or a plain completion prompt for base models.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import random
from collections.abc import Sequence
from typing import Any

import gin

from internlm2_jax.chat_format import render_chat
from internlm2_jax.eval.scoring import contains_value
from internlm2_jax.generate import generate
from internlm2_jax.tokenizer import Tokenizer

log = logging.getLogger(__name__)

NEEDLE = "The secret number is {value}."
QUESTION = "What is the secret number mentioned in the text above? Answer with the number only."
PLAIN_ANSWER_PREFIX = "Answer: The secret number is"

_SUBJECTS = ("The old farmer", "A quiet student", "The river", "Our neighbour", "The orchestra", "A tired traveller",
             "The village baker", "The grey cat", "A young painter", "The museum guide", "The wind", "My cousin")
_VERBS = ("walked past", "talked about", "painted", "remembered", "carried", "watched", "described", "ignored",
          "admired", "visited", "forgot", "followed")
_OBJECTS = ("the red barn", "a field of wheat", "the northern hills", "an empty bottle", "the town square",
            "a wooden bridge", "the evening sky", "a box of letters", "the harbour lights", "a small garden",
            "the library steps", "a forgotten song")
_TAILS = ("before sunrise", "in the rain", "after a long day", "without a word", "for the last time",
          "with great care", "at the edge of town", "during the festival", "while it snowed", "once again")


def generated_sentences(n: int, seed: int = 0) -> list[str]:
    """`n` digit-free filler sentences drawn (seeded) from a small grammar."""
    rng = random.Random(seed)
    return [f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_TAILS)}."
            for _ in range(n)]


def stdlib_sentences(max_sentences: int = 20000, cache_dir: str | None = None) -> list[str]:
    """Digit-free lines (20..200 chars) of the stdlib corpus' validation split, as filler "sentences"."""
    from internlm2_jax.input.stdlib_corpus import build_stdlib_corpus, corpus_texts

    out: list[str] = []
    for text in corpus_texts(build_stdlib_corpus(cache_dir), "validation"):
        for line in text.splitlines():
            line = line.strip()
            if 20 <= len(line) <= 200 and not any(c.isdigit() for c in line):
                out.append(line)
                if len(out) >= max_sentences:
                    return out
    if not out:
        raise ValueError("the stdlib corpus gave no filler lines")
    return out


@dataclasses.dataclass(frozen=True)
class Haystack:
    """One needle prompt. Positions index `prompt`; the haystack is `prompt[context_start:context_end]`."""

    prompt: list[int]
    value: str
    needle_start: int
    needle_len: int
    context_start: int
    context_end: int
    depth: float
    """Requested depth in [0, 1]."""
    actual_depth: float
    """Filler tokens before the needle / all filler tokens."""
    max_sentence_tokens: int


def prompt_frame(tok: Tokenizer, prompt_format: str = "chat",
                 question: str = QUESTION) -> tuple[list[int], list[int]]:
    """`(head, tail)` ids around the haystack.

    chat: `encode_chat([user: "<haystack>\\n\\n" + question], add_generation_prompt=True)` split at the
    content start; plain: `[bos]` + haystack + `"\\n\\nQuestion: ...\\nAnswer: The secret number is"`.
    """
    if prompt_format == "chat":
        mark = "\ue000"  # a private-use character standing for the haystack in the rendered chat
        text = render_chat([{"role": "user", "content": mark + "\n\n" + question}], add_generation_prompt=True).text
        head, tail = text.split(mark)
        return tok.encode(head), tok.encode(tail)
    if prompt_format == "plain":
        return [tok.bos_id], tok.encode(f"\n\nQuestion: {question}\n{PLAIN_ANSWER_PREFIX}")
    raise ValueError(f"unknown prompt_format {prompt_format!r}; expected 'chat' or 'plain'")


def build_haystack(tok: Tokenizer, sentences: Sequence[str], *, context_length: int, depth: float, value: str,
                   prompt_format: str = "chat", question: str = QUESTION, needle: str = NEEDLE,
                   offset: int = 0) -> Haystack:
    """A prompt of at most `context_length` tokens with the needle at `depth` (0 = start, 1 = end).

    Filler sentences are taken cyclically from `sentences[offset:]`. The needle start is within one
    sentence of `depth * filler_tokens` after the head.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    head, tail = prompt_frame(tok, prompt_format, question)
    needle_ids = tok.encode(" " + needle.format(value=value))
    budget = context_length - len(head) - len(tail) - len(needle_ids)
    if budget <= 0:
        raise ValueError(f"context_length {context_length} leaves no room for filler "
                         f"(frame + needle = {context_length - budget} tokens)")
    pieces: list[list[int]] = []
    total = 0
    for s in itertools.islice(itertools.cycle(sentences), offset % max(len(sentences), 1), None):
        ids = tok.encode(" " + s)
        if total + len(ids) > budget:
            break
        pieces.append(ids)
        total += len(ids)
        if len(pieces) > 10 * context_length:  # empty sentences cannot loop forever
            break
    cum = list(itertools.accumulate((len(p) for p in pieces), initial=0))
    k = min(range(len(cum)), key=lambda i: abs(cum[i] - depth * total))
    context = [t for p in pieces[:k] for t in p] + needle_ids + [t for p in pieces[k:] for t in p]
    start = len(head) + cum[k]
    return Haystack(prompt=head + context + tail, value=value, needle_start=start, needle_len=len(needle_ids),
                    context_start=len(head), context_end=len(head) + len(context), depth=depth,
                    actual_depth=cum[k] / total if total else 0.0,
                    max_sentence_tokens=max((len(p) for p in pieces), default=0))


def needle_value(seed: int, length: int, depth: float, trial: int) -> str:
    """The cell's 4-digit secret (seeded, so reruns ask for the same numbers)."""
    return str(random.Random(f"{seed}-{length}-{depth}-{trial}").randrange(1000, 10000))


@gin.configurable(denylist=["config", "params", "tok"])
def needle_suite(config: Any, params: Any, tok: Tokenizer, *,
                 context_lengths: Sequence[int] = (1024, 2048, 4096),
                 depths: Sequence[float] = (0, 25, 50, 75, 100),
                 trials: int = 1, filler: str = "generated", prompt_format: str = "chat",
                 value: str | None = None, max_new_tokens: int = 16, batch_size: int = 4,
                 seed: int = 0) -> dict[str, Any]:
    """Runs the grid; `depths` are percents. Returns `{"grid": [L][D] mean scores, ...}`.

    Each cell's score is the fraction of its `trials` whose greedy answer contains the secret
    (`value`, or a seeded 4-digit number per trial). Prompts of one length run `batch_size` at a time.
    """
    sentences = generated_sentences(4096, seed) if filler == "generated" else stdlib_sentences()
    stops = tuple(tok.stop_ids)
    grid: list[list[float]] = []
    samples: list[dict[str, Any]] = []
    for length in context_lengths:
        cells = [(d, t) for d in depths for t in range(trials)]
        stacks = [build_haystack(tok, sentences, context_length=int(length), depth=float(d) / 100.0,
                                 value=value or needle_value(seed, int(length), float(d), t),
                                 prompt_format=prompt_format, offset=t * 97 + int(length)) for d, t in cells]
        outputs: list[list[int]] = []
        for i in range(0, len(stacks), batch_size):
            outputs += generate(config, params, [h.prompt for h in stacks[i:i + batch_size]],
                                max_new_tokens=max_new_tokens, stop_ids=stops, pad_id=tok.pad_id,
                                vocab_limit=tok.vocab_size)
        scores: dict[float, list[float]] = {float(d): [] for d in depths}
        for (d, t), h, out in zip(cells, stacks, outputs):
            text = tok.decode(out, skip_special=True)
            found = contains_value(text, h.value)
            scores[float(d)].append(float(found))
            samples.append({"context_length": int(length), "depth": float(d), "trial": t, "value": h.value,
                            "prompt_tokens": len(h.prompt), "needle_start": h.needle_start,
                            "actual_depth": round(h.actual_depth, 4), "output": text[:200], "found": found})
        grid.append([sum(v) / len(v) for v in scores.values()])
        log.info("needle length %d: %s", length, grid[-1])
    flat = [s for row in grid for s in row]
    return {"context_lengths": [int(x) for x in context_lengths], "depths": [float(d) for d in depths],
            "grid": grid, "mean": sum(flat) / len(flat), "trials": trials, "filler": filler,
            "prompt_format": prompt_format, "samples": samples}
