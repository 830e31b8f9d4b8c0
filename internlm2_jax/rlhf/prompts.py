"""Real-data pieces of PPO: prompt JSONL, the tokenizer, the reward token and the RM's turn ending.

Prompt records (one JSON object per line): `{"prompt": str}` (one user turn) or `{"messages": [...]}`
(the conversation so far, ending with a user turn), each with an optional `"category"` (the RM condition).

The RM is trained on `render(conditioned conversation) + [reward]`, where every turn ends with
`<|im_end|>` and the ids of `"\\n"`. A sampled response ends with the stop id (`<|im_end|>`) and no newline,
so the scorer strips the stop ids and appends `turn_end_ids(tok)` before the reward token.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

from internlm2_jax.rlhf.preference_data import read_jsonl
from internlm2_jax.rlhf.toy_tasks import CharTokenizer
from internlm2_jax.tokenizer import RELEASED_VOCAB_SIZE, REWARD_TOKEN_ID, Tokenizer

AnyTokenizer = Union[Tokenizer, CharTokenizer]
SPARE_REWARD_PIECE = "[UNUSED_TOKEN_1]"


def prompt_record(rec: dict[str, Any]) -> dict[str, Any]:
    """Normalizes a prompt record to `{"messages": [...], "category": str | None}`."""
    if "messages" in rec:
        msgs = list(rec["messages"])
    elif "prompt" in rec:
        msgs = [{"role": "user", "content": rec["prompt"]}]
    else:
        raise ValueError(f"prompt record needs 'prompt' or 'messages', got {sorted(rec)}")
    return {"messages": msgs, "category": rec.get("category")}


def read_prompts(paths: Union[str, Sequence[str]]) -> list[dict[str, Any]]:
    """All prompt records of one or more JSONL files, normalized by `prompt_record`."""
    paths = [paths] if isinstance(paths, str) else list(paths)
    return [prompt_record(r) for p in paths for r in read_jsonl(p)]


def load_tokenizer(spec: Optional[str]) -> AnyTokenizer:
    """`None` / `"char"` → the toy `CharTokenizer`; else a sentencepiece model path (file or folder)."""
    return CharTokenizer() if spec in (None, "char") else Tokenizer(spec)


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
