"""Conversation formats → messages, hand-written loss mask with a tool call, bad lines, render_mask."""

import json

import pytest
import sentencepiece as spm

from internlm2_jax.data.tokenizer_training import train_tokenizer
from internlm2_jax.sft.formats import (FormatError, load_conversations, load_sft_examples, parse_chatml, render_mask,
                                       to_messages, tokenize_conversation)
from internlm2_jax.tokenizer import Tokenizer

CORPUS = ["The weather in Paris is sunny. What is the weather in Berlin?",
          "user assistant system environment name plugin", '{"name": "get_weather", "parameters": {}}'] * 40

TOOL_CONV = [
    {"role": "user", "content": "Weather?"},
    {"role": "assistant", "content": "Let me check.", "tool_call": {"name": "w", "parameters": {"c": "P"}}},
    {"role": "environment", "name": "plugin", "content": "sunny"},
    {"role": "assistant", "content": "Sunny."},
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return Tokenizer(train_tokenizer(CORPUS, str(tmp_path_factory.mktemp("tok") / "t"), vocab_size=384))


def test_tool_call_mask_hand_written(tok):
    e = spm.SentencePieceProcessor(model_file=tok.path).encode
    s = tok.special_ids
    S, E, AS, AE, PL = s["<|im_start|>"], s["<|im_end|>"], s["<|action_start|>"], s["<|action_end|>"], s["<|plugin|>"]
    call = json.dumps({"name": "w", "parameters": {"c": "P"}})
    segments = [  # (ids, trained?)
        ([tok.bos_id], False),
        ([S] + e("user\n") + e("Weather?") + [E] + e("\n"), False),
        ([S] + e("assistant\n"), False),
        (e("Let me check.") + [AS, PL] + e("\n" + call) + [AE, E], True),
        (e("\n"), False),
        ([S] + e("environment name=") + [PL] + e("\n") + e("sunny") + [E] + e("\n"), False),
        ([S] + e("assistant\n"), False),
        (e("Sunny.") + [E], True),
        (e("\n"), False),
    ]
    want_ids = [t for ids, _ in segments for t in ids]
    want_mask = [m for ids, m in segments for _ in ids]
    ids, mask = tokenize_conversation(tok, TOOL_CONV)
    assert ids == want_ids and mask == want_mask
    ids2, mask2 = tokenize_conversation(tok, TOOL_CONV, last_turn_only=True)
    last = sum(len(i) for i, _ in segments[:7])
    assert ids2 == ids and mask2 == [False] * last + want_mask[last:]
    shown = render_mask(tok, ids, mask)
    assert "[[Sunny.<|im_end|>]]" in shown and "[[Let me check.<|action_start|>" in shown
    assert "\x1b[32m" in render_mask(tok, ids, mask, color=True)


def test_formats_convert():
    openai = {"messages": [
        {"role": "system", "content": "sys"}, {"role": "user", "content": [{"type": "text", "text": "Weather?"}]},
        {"role": "assistant", "content": "Let me check.",
         "tool_calls": [{"type": "function", "function": {"name": "w", "arguments": '{"c": "P"}'}}]},
        {"role": "tool", "tool_call_id": "1", "content": "sunny"}, {"role": "assistant", "content": "Sunny."}],
        "tools": [{"type": "function", "function": {"name": "w"}}]}
    assert to_messages(openai) == [{"role": "system", "content": "sys"},
                                   {"role": "system", "name": "plugin", "content": '[{"name": "w"}]'}] + TOOL_CONV
    assert to_messages({"instruction": "Add", "input": "1 2", "output": "3"}) == [
        {"role": "user", "content": "Add\n\n1 2"}, {"role": "assistant", "content": "3"}]
    share = {"system": "sys", "conversations": [
        {"from": "human", "value": "Weather?"}, {"from": "function_call", "value": '{"name": "w", "arguments": {}}'},
        {"from": "observation", "value": "sunny"}, {"from": "gpt", "value": "Sunny."}]}
    assert to_messages(share) == [
        {"role": "system", "content": "sys"}, {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "", "tool_call": {"name": "w", "parameters": {}}},
        {"role": "environment", "name": "plugin", "content": "sunny"}, {"role": "assistant", "content": "Sunny."}]


def test_chatml_round_trip(tok):
    text = tok.decode(tok.encode_chat(TOOL_CONV))
    assert parse_chatml(text) == TOOL_CONV
    assert to_messages({"text": text}) == TOOL_CONV
    with pytest.raises(FormatError, match="outside"):
        parse_chatml("junk" + text)


def test_chatml_round_trip_interpreter_named_turns_and_lagent_plugin_form():
    from internlm2_jax.chat_format import render_chat

    conv = [{"role": "system", "name": "interpreter", "content": "You can run Python."},
            {"role": "user", "content": "Mean of data.csv?"},
            {"role": "user", "name": "file", "content": '[{"path": "data.csv"}]'},
            {"role": "assistant", "content": "Computing.\n\n",
             "tool_call": {"type": "interpreter", "code": "```python\nprint(2)\n```"}},
            {"role": "environment", "name": "interpreter", "content": "2\n"},
            {"role": "assistant", "content": "It is 2."}]
    text = render_chat(conv).text
    assert "```<|action_end|>\n<|im_end|>" in text  # chat_format.md's interpreter form
    assert parse_chatml(text) == conv and render_chat(parse_chatml(text)).text == text
    lagent = render_chat(TOOL_CONV).text.replace("<|action_end|><|im_end|>", "<|action_end|>\n<|im_end|>")
    assert parse_chatml(lagent) == TOOL_CONV  # Lagent's plugin form reads the same


def test_bad_lines_error_or_skip(tmp_path, tok):
    good = json.dumps({"instruction": "a", "output": "b"})
    lines = [good, "{not json", json.dumps({"messages": [{"role": "wizard", "content": "x"}]}),
             json.dumps({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "  "}]}), "",
             good]
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(FormatError, match=r"d\.jsonl:2: bad JSON"):
        load_conversations(p)
    res = load_conversations(p, on_error="skip")
    assert len(res.conversations) == 2 and res.skipped == 3
    assert ":3: " in res.errors[1] and "unknown role 'wizard'" in res.errors[1]
    assert ":4: " in res.errors[2] and "empty assistant turn" in res.errors[2]
    examples, res2 = load_sft_examples(p, tok, on_error="skip")
    assert res2.skipped == 3 and examples[0] == tok.encode_chat_with_mask(res.conversations[0])
    with pytest.raises(FormatError, match="cannot detect"):
        to_messages({"foo": 1})
