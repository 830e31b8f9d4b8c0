"""Real-data pieces of PPO: prompt JSONL, the tokenizer, the reward token and the RM's turn ending.

Prompt records (one JSON object per line): `{"prompt": str}` (one user turn) or `{"messages": [...]}`
(the conversation so far, ending with a user turn), each with an optional `"category"` (the RM condition).

The RM is trained on `render(conditioned conversation) + [reward]`, where every turn ends with
`<|im_end|>` and the ids of `"\\n"`. A sampled response ends with the stop id (`<|im_end|>`) and no newline,
so the scorer strips the stop ids and appends `turn_end_ids(tok)` before the reward token.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence, Union

from internlm2_jax.chat_format import render_chat
from internlm2_jax.errors import InputDataError
from internlm2_jax.jsonl import JsonlRecords, read_jsonl_records
from internlm2_jax.rlhf.toy_tasks import CharTokenizer
from internlm2_jax.tokenizer import RELEASED_VOCAB_SIZE, REWARD_TOKEN_ID, Tokenizer

AnyTokenizer = Union[Tokenizer, CharTokenizer]
SPARE_REWARD_PIECE = "[UNUSED_TOKEN_1]"


def prompt_record(rec: Any, conditions: Optional[Mapping[str, str]] = None) -> dict[str, Any]:
    """Normalizes a prompt record to `{"messages": [...], "category": str | None}`; `ValueError` saying what
    is wrong for a record that is not one (checked as the chat it renders; a `category` unknown to
    `conditions`, when given)."""
    if not isinstance(rec, dict):
        raise ValueError(f"a prompt record must be a JSON object, got {type(rec).__name__}")
    if "messages" in rec:
        if not isinstance(rec["messages"], list) or not rec["messages"]:
            raise ValueError("'messages' must be a non-empty list of messages")
        msgs = list(rec["messages"])
    elif "prompt" in rec:
        msgs = [{"role": "user", "content": rec["prompt"]}]
    else:
        raise ValueError(f"prompt record needs 'prompt' or 'messages', got {sorted(rec)}")
    render_chat(msgs, add_generation_prompt=True)  # roles and contents: what tokenization would reject
    cat = rec.get("category")
    if cat is not None and not isinstance(cat, str):
        raise ValueError(f"category must be a string, got {type(cat).__name__}")
    if cat is not None and conditions is not None and cat not in conditions:
        raise ValueError(f"unknown reward condition {cat!r}; known: {sorted(conditions)}")
    return {"messages": msgs, "category": cat}


def read_prompts(paths: Union[str, Sequence[str]], on_error: str = "raise",
                 conditions: Optional[Mapping[str, str]] = None) -> JsonlRecords:
    """All prompt records of one or more JSONL files, normalized by `prompt_record`: a bad line is
    `InputDataError("path:line: ...")` or, with `on_error="skip"`, counted in `.skipped`; no usable prompt in
    all the files is `EmptyDatasetError` (`internlm2_jax.jsonl.read_jsonl_records`)."""
    return read_jsonl_records(paths, lambda r: prompt_record(r, conditions), on_error, what="prompt")


def load_tokenizer(spec: Optional[str]) -> AnyTokenizer:
    """`None` / `"char"` → the toy `CharTokenizer`; else a sentencepiece model path (file or folder). A missing
    or unreadable model is an `InputDataError` (one `error:` line), not a traceback."""
    if spec in (None, "char"):
        return CharTokenizer()
    try:
        return Tokenizer(spec)
    except (OSError, ValueError) as e:
        raise InputDataError(f"tokenizer {spec}: {e}" if str(spec) not in str(e) else str(e)) from e


def default_reward_token_id(tok: AnyTokenizer) -> int:
    """The reward token: the char tokenizer's `<|reward|>`, `REWARD_TOKEN_ID` for the released 92544-piece
    tokenizer, else the spare `[UNUSED_TOKEN_1]` piece of a tokenizer trained here."""
    if isinstance(tok, CharTokenizer):
        return tok.reward_id
    if tok.vocab_size == RELEASED_VOCAB_SIZE:
        return REWARD_TOKEN_ID
    rid = tok.sp.piece_to_id(SPARE_REWARD_PIECE)
    if rid == tok.sp.unk_id():
        raise ValueError(f"tokenizer {tok.path} has no {SPARE_REWARD_PIECE} piece; set reward_token_id")
    return int(rid)


def turn_end_ids(tok: AnyTokenizer) -> list[int]:
    """Ids closing an assistant turn exactly as `encode_chat` renders it: `<|im_end|>` then `"\\n"`."""
    return [tok.im_end_id] + list(tok.encode("\n"))
