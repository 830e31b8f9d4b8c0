"""Preference pairs: record parsing, conditional tokenization, and token-budget packing.

Accepted records (JSON objects, e.g. one per JSONL line), each with an optional `condition` field:
  * `{"prompt": str | [messages], "chosen": str | [messages], "rejected": str | [messages]}`
  * `{"chosen": [messages], "rejected": [messages]}` — full conversations including the prompt.
A string prompt is one user turn, a string response one assistant turn. The condition's system prompt is
prepended as the first turn, and the reward token is appended after the rendered conversation.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Mapping, Optional, Protocol, Sequence, Union

import numpy as np

from internlm2_jax.chat_format import render_chat
from internlm2_jax.jsonl import JsonlRecords, read_jsonl_records
from internlm2_jax.rlhf.reward_model import condition_prompt

Message = dict[str, Any]


class ChatEncoder(Protocol):
    """What the RM data needs from a tokenizer (`internlm2_jax.tokenizer.Tokenizer` satisfies it)."""

    def encode_chat(self, messages: Sequence[Message], *, add_generation_prompt: bool = False) -> list[int]: ...

    def encode_chat_with_mask(self, messages: Sequence[Message], *, add_generation_prompt: bool = False,
                              train_on: str = "all") -> tuple[list[int], list[bool]]: ...


@dataclasses.dataclass
class PreferencePair:
    """One tokenized pair: chosen/rejected ids each end with the reward token."""

    chosen: list[int]
    rejected: list[int]
    condition: Optional[str] = None


def _turns(x: Any, role: str, field: str) -> list[Message]:
    if isinstance(x, str):
        return [{"role": role, "content": x}]
    if isinstance(x, list) and all(isinstance(m, dict) for m in x):
        return list(x)
    raise ValueError(f"{field!r}: expected a string or a list of messages, got {type(x).__name__}")


def record_conversations(record: Mapping[str, Any]) -> tuple[list[Message], list[Message]]:
    """(chosen, rejected) message lists of a record in either accepted format (no condition turn)."""
    if "chosen" not in record or "rejected" not in record:
        raise ValueError(f"preference record needs 'chosen' and 'rejected' fields, got {sorted(record)}")
    prompt = _turns(record["prompt"], "user", "prompt") if record.get("prompt") is not None else []
    return (prompt + _turns(record["chosen"], "assistant", "chosen"),
            prompt + _turns(record["rejected"], "assistant", "rejected"))


def conditioned(messages: Sequence[Message], condition: Optional[str], conditions: Mapping[str, str]) -> list[Message]:
    """Prepends the condition's system prompt (if any) to `messages`."""
    system = condition_prompt(condition, conditions)
    return ([{"role": "system", "content": system}] if system is not None else []) + list(messages)


def encode_for_reward(tok: ChatEncoder, messages: Sequence[Message], condition: Optional[str],
                      conditions: Mapping[str, str], reward_token_id: int) -> list[int]:
    """Token ids the RM scores: rendered (conditioned) conversation + reward token."""
    return tok.encode_chat(conditioned(messages, condition, conditions)) + [int(reward_token_id)]


def tokenize_pairs(records: Sequence[Mapping[str, Any]], tok: ChatEncoder, conditions: Mapping[str, str],
                   reward_token_id: int, *, max_len: int,
                   default_condition: Optional[str] = None) -> tuple[list[PreferencePair], int]:
    """Tokenizes records; pairs where either side exceeds `max_len` tokens are dropped.

    Returns (pairs, number dropped).
    """
    pairs, dropped = [], 0
    for rec in records:
        cond = rec.get("condition", default_condition)
        chosen, rejected = record_conversations(rec)
        c = encode_for_reward(tok, chosen, cond, conditions, reward_token_id)
        r = encode_for_reward(tok, rejected, cond, conditions, reward_token_id)
        if max(len(c), len(r)) > max_len:
            dropped += 1
            continue
        pairs.append(PreferencePair(c, r, cond))
    return pairs, dropped


def check_pair_record(record: Any, conditions: Optional[Mapping[str, str]] = None) -> dict[str, Any]:
    """`record` if it is a usable preference pair, else `ValueError` saying what is wrong: both sides render
    as chats, and its `condition` (if any) is a string known to `conditions` (when given)."""
    if not isinstance(record, dict):
        raise ValueError(f"a preference pair must be a JSON object, got {type(record).__name__}")
    for side in record_conversations(record):
        render_chat(side)  # roles, contents, tool calls: the errors tokenization would raise, found here
    cond = record.get("condition")
    if cond is not None and not isinstance(cond, str):
        raise ValueError(f"condition must be a string, got {type(cond).__name__}")
    if cond is not None and conditions is not None and cond not in conditions:
        raise ValueError(f"unknown reward condition {cond!r}; known: {sorted(conditions)}")
    return record


def read_preference_pairs(paths: Union[str, Sequence[str]], on_error: str = "raise",
                          conditions: Optional[Mapping[str, str]] = None, *, allow_empty: bool = False) -> JsonlRecords:
    """Checked preference records of one or more JSONL files (`internlm2_jax.jsonl.read_jsonl_records`):
    a bad line is `InputDataError("path:line: ...")` or, with `on_error="skip"`, counted in `.skipped`;
    no usable pair in all the files is `EmptyDatasetError` unless `allow_empty` (the caller has other pairs)."""
    return read_jsonl_records(paths, lambda r: check_pair_record(r, conditions), on_error, what="preference pair",
                              allow_empty=allow_empty)


def pack_pairs(pairs: Sequence[PreferencePair], *, token_budget: int = 16384, row_len: int = 2048,
               max_pairs: Optional[int] = None, condition_names: Sequence[str] = (),
               pad_id: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """Groups pairs into batches of a fixed token budget (`token_budget // row_len` rows of `row_len`).

    Each pair's chosen and rejected sequences go into one row (first fit) as two segments; a batch is
    emitted when the next pair fits no row or `max_pairs` (default `token_budget // 16`) is reached.
    Yields numpy dicts with static shapes:
      tokens, positions, segment_ids `[R, L]` (segment 0 = padding);
      chosen_index, rejected_index `[M, 2]` (row, position of the reward token); pair_mask `[M]`;
      condition_id `[M]` (index into `condition_names`, −1 if absent).
    """
    rows = token_budget // row_len
    if rows < 1:
        raise ValueError(f"token_budget {token_budget} smaller than row_len {row_len}")
    m = max_pairs or max(token_budget // 16, 1)
    names = {n: i for i, n in enumerate(condition_names)}

    def fresh():
        return {"tokens": np.full((rows, row_len), pad_id, np.int32), "positions": np.zeros((rows, row_len), np.int32),
                "segment_ids": np.zeros((rows, row_len), np.int32), "chosen_index": np.zeros((m, 2), np.int32),
                "rejected_index": np.zeros((m, 2), np.int32), "pair_mask": np.zeros((m,), np.float32),
                "condition_id": np.full((m,), -1, np.int32)}, [0] * rows, 0

    batch, used, n = fresh()
    for pair in pairs:
        need = len(pair.chosen) + len(pair.rejected)
        if need > row_len:
            raise ValueError(f"pair of {need} tokens does not fit a row of {row_len}")
        row = next((i for i in range(rows) if used[i] + need <= row_len), None)
        if row is None or n == m:
            yield batch
            batch, used, n = fresh()
            row = 0
        for seq, key in ((pair.chosen, "chosen_index"), (pair.rejected, "rejected_index")):
            s, e = used[row], used[row] + len(seq)
            batch["tokens"][row, s:e] = seq
            batch["positions"][row, s:e] = np.arange(len(seq))
            batch["segment_ids"][row, s:e] = 2 * n + 1 + (key == "rejected_index")
            batch[key][n] = (row, e - 1)
            used[row] = e
        batch["pair_mask"][n] = 1.0
        batch["condition_id"][n] = names.get(pair.condition, -1)
        n += 1
    if n:
        yield batch
