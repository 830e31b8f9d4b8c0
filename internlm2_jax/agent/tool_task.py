"""A generated tool-use task: multiplication a tiny model cannot do alone, solved with the `calculator` plugin.

    "What is 4821*37?"  (a: 3-4 digits, b: 2-3 digits)

With tools (`tools_fraction` of the records) the conversation is the agent's own: the plugin list, the
question, a `calculator` call, its `environment` result, and the answer copied from it. Without tools the
answer follows the question directly, so one checkpoint answers both ways and the agent can measure what the
tool adds (`evaluate`). Records are ChatML text (`{"text", "question", "answer", "tools"}`), rendered by
`chat_format.render_chat` from the agent's turns, so training sees exactly the prompts the agent builds.
`python -m experiments.sft --gin experiments/configs/sft/tiny_tools.gin` trains on it (`sft_train.task =
'calculator'`, written by `sft.tasks.write_task`).
"""

from __future__ import annotations

import json
import random
from typing import Any, Sequence

from internlm2_jax.agent.loop import Agent
from internlm2_jax.agent.plugins import CALCULATOR, calculate
from internlm2_jax.agent.protocol import environment, plugins_turn
from internlm2_jax.chat_format import render_chat

Record = dict[str, Any]


def _question(rng: random.Random) -> tuple[str, str]:
    a = rng.randrange(100, 10000)
    b = rng.randrange(10, 1000)
    return f"{a}*{b}", f"What is {a}*{b}?"


def conversation(expression: str, question: str, *, tools: bool) -> list[dict[str, Any]]:
    """The chat_format messages of one worked example (with a calculator call when `tools`)."""
    answer = calculate(expression)
    if not tools:
        return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return [plugins_turn([CALCULATOR]), {"role": "user", "content": question},
            {"role": "assistant", "content": "",
             "tool_call": {"name": CALCULATOR.name, "parameters": {"expression": expression}}},
            environment("plugin", answer), {"role": "assistant", "content": answer}]


def make_records(n: int, seed: int = 0, *, exclude: frozenset[str] = frozenset(), system: bool = False,
                 tools_fraction: float = 0.75) -> list[Record]:
    """`n` records with distinct questions outside `exclude` (`system` is unused: the task has no system turn)."""
    del system
    rng, seen, out = random.Random(f"calculator-{seed}"), set(exclude), []
    while len(out) < n:
        expression, question = _question(rng)
        if question in seen:
            continue
        seen.add(question)
        tools = rng.random() < tools_fraction
        messages = conversation(expression, question, tools=tools)
        out.append({"text": render_chat(messages).text, "question": question, "answer": messages[-1]["content"],
                    "tools": tools})
    return out


def question_of(record: Record) -> str:
    return record["question"]


def texts_of(record: Record) -> list[str]:
    """Text for the tokenizer trainer: the record without its special tokens (headers and JSON included)."""
    text = record["text"]
    for special in ("<s>", "<|im_start|>", "<|im_end|>", "<|action_start|>", "<|action_end|>", "<|plugin|>"):
        text = text.replace(special, "\n")
    return [text]


def read_questions(path: str) -> list[tuple[str, str]]:
    """`(question, answer)` pairs of a task JSONL file (e.g. the held-out `eval.jsonl`)."""
    with open(path, encoding="utf-8") as f:
        return [(r["question"], r["answer"]) for r in map(json.loads, filter(str.strip, f))]


def evaluate(agent: Agent, pairs: Sequence[tuple[str, str]], batch_size: int = 64) -> dict[str, float]:
    """Through the agent loop: `accuracy` (answer == reference), `tool_use` (runs with a successful tool call),
    `solved_with_tool` (correct and a tool ran without error)."""
    runs = []
    for s in range(0, len(pairs), batch_size):
        runs += agent.run_batch([q for q, _ in pairs[s:s + batch_size]])
    correct = [(r.answer or "").strip() == a for r, (_, a) in zip(runs, pairs)]
    used = [r.tool_calls > r.tool_errors for r in runs]
    n = max(len(runs), 1)
    return {"accuracy": sum(correct) / n, "tool_use": sum(used) / n,
            "solved_with_tool": sum(c and u for c, u in zip(correct, used)) / n, "n": float(len(runs))}
