"""Tokenizer wrapper: special strings → single ids, InternLM2 chat format with a tool call."""

import json

import pytest
import sentencepiece as spm

from internlm2_jax.data.tokenizer_training import train_tokenizer
from internlm2_jax.tokenizer import RELEASED_SPECIAL_IDS, Tokenizer

CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "The weather in Paris is sunny today. What is the weather in Berlin?",
    "You are a helpful assistant. Call tools when needed.",
    "user assistant system environment name plugin interpreter",
    '{"name": "get_weather", "parameters": {"city": "Paris"}} 12345 67890',
] * 40


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = train_tokenizer(CORPUS, str(tmp_path_factory.mktemp("tok") / "t"), vocab_size=384)
    return Tokenizer(path)


def test_special_strings_become_single_ids(tok):
    sp = spm.SentencePieceProcessor(model_file=tok.path)
    v = tok.vocab_size
    assert v % 128 == 0
    assert [tok.special_ids[s] for s in RELEASED_SPECIAL_IDS] == list(range(v - 6, v))
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == v - 1 and ids[-1] == v - 2
    assert ids[1:-1] == sp.encode("user\nhi")
    assert tok.decode(ids) == "<|im_start|>user\nhi<|im_end|>"
    assert tok.decode(ids, skip_special=True) == "user\nhi"


def test_encode_chat_tool_call_hand_written(tok):
    sp = spm.SentencePieceProcessor(model_file=tok.path)
    e = sp.encode
    S, END, ST = tok.special_ids["<|im_start|>"], tok.special_ids["<|im_end|>"], tok.special_ids["<|action_start|>"]
    AE, PL = tok.special_ids["<|action_end|>"], tok.special_ids["<|plugin|>"]
    call = {"name": "get_weather", "parameters": {"city": "Paris"}}
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "system", "name": "plugin", "content": '[{"name": "get_weather"}]'},
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": "Let me check.", "tool_call": call},
        {"role": "environment", "name": "plugin", "content": '{"temp": 21}'},
        {"role": "assistant", "content": "It is 21 degrees."},
    ]
    nl = e("\n")
    expected = (
        [1]
        + [S] + e("system\nYou are a helpful assistant.") + [END] + nl
        + [S] + e("system name=") + [PL] + nl + e('[{"name": "get_weather"}]') + [END] + nl
        + [S] + e("user\nWhat is the weather in Paris?") + [END] + nl
        + [S] + e("assistant\nLet me check.") + [ST, PL] + nl + e(json.dumps(call)) + [AE, END] + nl
        + [S] + e("environment name=") + [PL] + nl + e('{"temp": 21}') + [END] + nl
        + [S] + e("assistant\nIt is 21 degrees.") + [END] + nl
    )
    assert tok.encode_chat(messages) == expected
    gen = tok.encode_chat(messages[:3], add_generation_prompt=True)
    assert gen[-(1 + len(e("assistant\n"))):] == [S] + e("assistant\n")
    assert tok.stop_ids == (2, END)


def test_chat_mask_covers_assistant_content_and_im_end(tok):
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    ids, mask = tok.encode_chat_with_mask(msgs)
    kept = [i for i, m in zip(ids, mask) if m]
    assert kept == tok.sp.encode("hello") + [tok.im_end_id]


def test_broken_tokenizer_config_is_named(tok, tmp_path):
    import shutil

    shutil.copy(tok.path, tmp_path / "tokenizer.model")
    for text, match in (("{", "not valid JSON"), ('{"added_tokens_decoder": {"1": {"nope": 1}}}', "added_tokens")):
        (tmp_path / "tokenizer_config.json").write_text(text)
        with pytest.raises(ValueError, match=rf"tokenizer_config\.json: .*{match}"):
            Tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": {
        str(i): {"content": s} for s, i in tok.special_ids.items()}}))
    assert Tokenizer(tmp_path).special_ids == tok.special_ids


def test_errors(tok, tmp_path):
    with pytest.raises(ValueError, match="unknown role 'bot'"):
        tok.encode_chat([{"role": "bot", "content": "x"}])
    with pytest.raises(FileNotFoundError):
        Tokenizer(tmp_path / "missing.model")
    with pytest.raises(ValueError, match="tokenizer mismatch"):
        tok.check_compatible(128)


@pytest.mark.parametrize("train_on", ["all", "last", "none"])
def test_chat_mask_fast_path_equals_offsets(tok, train_on):
    """encode_chat_with_mask skips per-token offsets where it can; it must equal the offsets-based mask."""
    from internlm2_jax.chat_format import mask_from_offsets, render_chat

    contents = ["\nA", "\n\nB", " C", "  D", "", "E\n", "中文", "😀x", "\tT", "assistant\n", "<s>x</s>"]
    for content in contents:
        msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
                {"role": "assistant", "content": content}, {"role": "user", "content": content},
                {"role": "assistant", "content": content, "tool_call": {"name": "f", "parameters": {}}}]
        chat = render_chat(msgs, train_on=train_on)
        ids, spans = tok.encode_with_offsets(chat.text)
        assert tok.encode_chat_with_mask(msgs, train_on=train_on) == (ids, mask_from_offsets(spans, chat.trained))
