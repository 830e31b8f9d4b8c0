"""Generated exact-match tasks: arithmetic and in-context QA, asked in chat format, answered greedily.

Every reference is a deterministic function of the prompt, so scoring is `scoring.exact_match`
(normalized text, or the first number for numeric answers). Tasks:

  * `add`:      "What is 23 + 58?" → "81"
  * `subtract`: "What is 71 - 15?" → "56"
  * `multiply`: "What is 7 * 12?" → "84"
  * `word`:     "Mia has 4 apples and buys 9 more. How many apples does Mia have now?" → "13"
  * `lookup`:   "Tom lives in Paris. Anna lives in Oslo. Where does Anna live?" → "Oslo"
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Sequence
from typing import Any

import gin

from internlm2_jax.eval.scoring import exact_match
from internlm2_jax.generate import generate
from internlm2_jax.tokenizer import Tokenizer

SYSTEM = "Answer with the final answer only."
_NAMES = ("Tom", "Anna", "Mia", "Liam", "Zoe", "Omar", "Ivy", "Noah", "Lena", "Raj")
_CITIES = ("Paris", "Oslo", "Lima", "Cairo", "Tokyo", "Rome", "Quito", "Delhi", "Accra", "Hanoi")
_ITEMS = ("apples", "books", "coins", "stamps", "marbles", "pencils")


@dataclasses.dataclass(frozen=True)
class Example:
    """One question: chat `messages` (without the answer) and the `reference` answer string."""

    task: str
    messages: list[dict[str, str]]
    reference: str


def _add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randrange(100), rng.randrange(100)
    return f"What is {a} + {b}?", str(a + b)


def _subtract(rng: random.Random) -> tuple[str, str]:
    a, b = sorted((rng.randrange(100), rng.randrange(100)), reverse=True)
    return f"What is {a} - {b}?", str(a - b)


def _multiply(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randrange(2, 13), rng.randrange(2, 13)
    return f"What is {a} * {b}?", str(a * b)


def _word(rng: random.Random) -> tuple[str, str]:
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    a, b = rng.randrange(1, 20), rng.randrange(1, 20)
    return f"{name} has {a} {item} and buys {b} more. How many {item} does {name} have now?", str(a + b)


def _lookup(rng: random.Random) -> tuple[str, str]:
    people = rng.sample(_NAMES, 3)
    cities = rng.sample(_CITIES, 3)
    facts = " ".join(f"{p} lives in {c}." for p, c in zip(people, cities))
    k = rng.randrange(3)
    return f"{facts} Where does {people[k]} live?", cities[k]


TASKS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "add": _add, "subtract": _subtract, "multiply": _multiply, "word": _word, "lookup": _lookup}


def make_examples(task: str, n: int, seed: int = 0, *, system: bool = True) -> list[Example]:
    """`n` seeded examples of `task` (duplicates allowed only when the task has fewer distinct ones)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {sorted(TASKS)}")
    rng = random.Random(f"{task}-{seed}")
    seen: set[str] = set()
    out: list[Example] = []
    for _ in range(50 * n):
        if len(out) == n:
            break
        q, a = TASKS[task](rng)
        if q in seen and len(seen) < 20 * n:
            continue
        seen.add(q)
        msgs = ([{"role": "system", "content": SYSTEM}] if system else []) + [{"role": "user", "content": q}]
        out.append(Example(task, msgs, a))
    return out


def run_examples(config: Any, params: Any, tok: Tokenizer, messages: Sequence[Sequence[dict[str, Any]]], *,
                 max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy replies (decoded, specials skipped) to chat `messages`, `batch_size` prompts per call."""
    prompts = [tok.encode_chat(list(m), add_generation_prompt=True) for m in messages]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths share a bucket
    replies: dict[int, str] = {}
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        outs = generate(config, params, [prompts[i] for i in idx], max_new_tokens=max_new_tokens,
                        stop_ids=tuple(tok.stop_ids), pad_id=tok.pad_id, vocab_limit=tok.vocab_size)
        for i, out in zip(idx, outs):
            replies[i] = tok.decode(out, skip_special=True)
    return [replies[i] for i in range(len(prompts))]


@gin.configurable(denylist=["config", "params", "tok"])
def tasks_suite(config: Any, params: Any, tok: Tokenizer, *, tasks: Sequence[str] = ("add", "word", "lookup"),
                num_examples: int = 20, max_new_tokens: int = 12, batch_size: int = 16, seed: int = 0,
                system: bool = True, keep_samples: int = 5) -> dict[str, Any]:
    """Exact-match accuracy per task and overall, plus the first `keep_samples` answers per task."""
    per_task: dict[str, Any] = {}
    total, correct = 0, 0
    for task in tasks:
        examples = make_examples(task, num_examples, seed, system=system)
        replies = run_examples(config, params, tok, [e.messages for e in examples],
                               max_new_tokens=max_new_tokens, batch_size=batch_size)
        hits = [exact_match(r, e.reference) for r, e in zip(replies, examples)]
        per_task[task] = {"accuracy": sum(hits) / len(hits), "n": len(hits), "samples": [
            {"prompt": e.messages[-1]["content"], "reference": e.reference, "output": r[:200], "correct": h}
            for e, r, h in list(zip(examples, replies, hits))[:keep_samples]]}
        total, correct = total + len(hits), correct + sum(hits)
    return {"accuracy": correct / max(total, 1), "n": total, "tasks": per_task}
