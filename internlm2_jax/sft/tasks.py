"""Generated toy chat tasks for SFT demos and tests (OpenAI `messages` JSONL + a tokenizer trained on them).

Tasks (every answer is a deterministic function of the prompt, so exact match is well defined):

  * `add`:     "What is 23+58?" → "81" (operands 0..99)
  * `reverse`: "Reverse 48213" → "31284" (3–6 random digits)
  * `repeat`:  "Repeat 4821" → "4821" (4 random digits; the trivially learnable smoke task)
  * `calculator`: "What is 4821*37?" solved by calling the agent's calculator plugin (multi-turn ChatML
    records, `internlm2_jax.agent.tool_task`)

Digits tokenize one per token (`split_digits`), so the tasks are learnable by a tiny model. Train and
held-out prompts are disjoint.
"""

from __future__ import annotations

import json
import os
import random
from typing import Callable

TASKS = ("add", "reverse", "repeat", "calculator")
SYSTEM = "You are a precise calculator."


def _add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randrange(100), rng.randrange(100)
    return f"What is {a}+{b}?", str(a + b)


def _digits(rng: random.Random, lo: int = 3, hi: int = 6) -> str:
    return "".join(rng.choice("0123456789") for _ in range(rng.randint(lo, hi)))


def _reverse(rng: random.Random) -> tuple[str, str]:
    s = _digits(rng)
    return f"Reverse {s}", s[::-1]


def _repeat(rng: random.Random) -> tuple[str, str]:
    s = _digits(rng, 4, 4)
    return f"Repeat {s}", s


_MAKERS: dict[str, Callable[[random.Random], tuple[str, str]]] = {"add": _add, "reverse": _reverse, "repeat": _repeat}


def make_conversations(task: str, n: int, seed: int = 0, *, exclude: frozenset[str] = frozenset(),
                       system: bool = True) -> list[dict]:
    """`n` distinct OpenAI-format records `{"messages": [system?, user, assistant]}` whose prompts avoid `exclude`."""
    if task not in _MAKERS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    rng, seen, out = random.Random(f"{task}-{seed}"), set(exclude), []
    for _ in range(200 * n):
        if len(out) == n:
            break
        q, a = _MAKERS[task](rng)
        if q in seen:
            continue
        seen.add(q)
        msgs = ([{"role": "system", "content": SYSTEM}] if system else []) + [
            {"role": "user", "content": q}, {"role": "assistant", "content": a}]
        out.append({"messages": msgs})
    if len(out) < n:
        raise ValueError(f"task {task!r} has fewer than {n} distinct prompts left")
    return out


def _task_api(task: str) -> tuple[Callable[..., list[dict]], Callable[[dict], str], Callable[[dict], list[str]]]:
    """`(make(n, seed, exclude=, system=), question of a record, tokenizer texts of a record)` of a task."""
    if task == "calculator":  # multi-turn tool use: the agent's own turns as ChatML records
        from internlm2_jax.agent import tool_task

        return tool_task.make_records, tool_task.question_of, tool_task.texts_of
    return (lambda n, seed, **kw: make_conversations(task, n, seed, **kw), lambda r: r["messages"][-2]["content"],
            lambda r: [m["content"] for m in r["messages"]])


def _write(path: str, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def write_task(out_dir: str, task: str, num_train: int, num_eval: int, seed: int = 0,
               vocab_size: int = 384, system: bool = False) -> dict[str, str]:
    """Writes `train.jsonl`, `eval.jsonl` (disjoint prompts) and `tokenizer.model` into `out_dir` (once).

    Returns `{"train", "eval", "tokenizer"}` paths. Existing files are reused, so a resumed run sees
    exactly the same data and tokenizer.
    """
    paths = {k: os.path.join(out_dir, f) for k, f in
             (("train", "train.jsonl"), ("eval", "eval.jsonl"), ("tokenizer", "tokenizer.model"))}
    if all(os.path.exists(p) for p in paths.values()):
        return paths
    os.makedirs(out_dir, exist_ok=True)
    make, question_of, texts_of = _task_api(task)
    held = make(num_eval, seed + 1, system=system)
    train = make(num_train, seed, system=system, exclude=frozenset(map(question_of, held)))
    _write(paths["train"] + ".tmp", train)
    _write(paths["eval"] + ".tmp", held)
    from internlm2_jax.data.tokenizer_training import train_tokenizer

    texts = [t for r in train for t in texts_of(r)] + ["user assistant system\n"]
    train_tokenizer(texts, os.path.join(out_dir, "tokenizer"), vocab_size)
    os.replace(paths["train"] + ".tmp", paths["train"])
    os.replace(paths["eval"] + ".tmp", paths["eval"])
    return paths
