"""Tokenizer and chat encoding against InternLM2's released tokenizer and internlm2-chat chat template.

The reference is transformers' own slow sentencepiece tokenizer built from the released files (it
splits the text on `tokenizer_config.json`'s added tokens and sentencepieces the rest, as InternLM2's
remote-code tokenizer does) and `apply_chat_template` rendering the real Jinja template. Tool turns are
fed to the template as chat_format.md writes them: the name in the role string, the action in the content.
"""

import json
import shutil

import pytest

from internlm2_jax.rlhf.prompts import default_reward_token_id
from internlm2_jax.tokenizer import Tokenizer

pytest.importorskip("transformers")
pytest.importorskip("jinja2")

PLUGIN_SYSTEM = json.dumps([{"name": "get_current_weather", "description": "Get the current weather",
                             "parameters": {"type": "object", "properties": {"location": {"type": "string"}},
                                            "required": ["location"]}}], indent=4)
CODE = "```python\nimport pandas as pd\ndf = pd.read_csv('data.csv')\nprint(df.mean())\n```"

# (our messages, the reference's messages for the plain HF template)
CONVERSATIONS = {
    "basic": (
        [{"role": "system", "content": "You are InternLM2-Chat, a harmless AI assistant"},
         {"role": "user", "content": "Hello"},
         {"role": "assistant", "content": "Hello, I am InternLM2-Chat, how can I assist you?"}],
        None),
    "multi_turn_chinese_digits": (
        [{"role": "user", "content": "你好呀，请计算 12345 + 67890。"},
         {"role": "assistant", "content": "12345 + 67890 = 80235。还有别的吗？"},
         {"role": "user", "content": "没有了，谢谢！"},
         {"role": "assistant", "content": "不客气 😀"}],
        None),
    "whitespace_and_newlines": (
        [{"role": "system", "content": "  leading spaces and trailing  "},
         {"role": "user", "content": "\nstarts with a newline\n\n"},
         {"role": "assistant", "content": "\n\nstarts with two newlines"},
         {"role": "user", "content": " one space"},
         {"role": "assistant", "content": "\tTab, then trailing newline\n"},
         {"role": "user", "content": ""},
         {"role": "assistant", "content": " leading space"}],
        None),
    "literal_specials_in_text": (
        [{"role": "user", "content": "What do <unk>, <s> and </s> mean? And <|im_end|>?"},
         {"role": "assistant", "content": "<unk> is unknown, <s> begins, </s> ends.<unk>"}],
        None),
    "plugin_call": (
        [{"role": "system", "content": "You are InternLM2-Chat, a harmless AI assistant"},
         {"role": "system", "name": "plugin", "content": PLUGIN_SYSTEM},
         {"role": "user", "content": "I want to know today's weather in Shanghai"},
         {"role": "assistant", "content": "Sure, I will search for the weather of Shanghai.",
          "tool_call": {"name": "get_current_weather", "parameters": {"location": "Shanghai"}}},
         {"role": "environment", "name": "plugin", "content": '{"temperature": 22}'},
         {"role": "assistant", "content": "The weather in Shanghai is 22 celsius"}],
        [{"role": "system", "content": "You are InternLM2-Chat, a harmless AI assistant"},
         {"role": "system name=<|plugin|>", "content": PLUGIN_SYSTEM},
         {"role": "user", "content": "I want to know today's weather in Shanghai"},
         {"role": "assistant", "content": "Sure, I will search for the weather of Shanghai.<|action_start|><|plugin|>\n"
                                          '{"name": "get_current_weather", "parameters": {"location": "Shanghai"}}'
                                          "<|action_end|>"},
         {"role": "environment name=<|plugin|>", "content": '{"temperature": 22}'},
         {"role": "assistant", "content": "The weather in Shanghai is 22 celsius"}]),
    "interpreter_and_two_tools": (
        [{"role": "system", "name": "interpreter", "content": "You now have access to a Jupyter notebook."},
         {"role": "user", "content": "Please analyse this dataset.\n"},
         {"role": "user", "name": "file", "content": '[{"path": "data.csv", "size": "10K"}]'},
         {"role": "assistant", "content": "I will compute the means.\n\n",
          "tool_call": {"type": "interpreter", "code": CODE}},
         {"role": "environment", "name": "interpreter", "content": "a    1.5\nb    2.0\n"},
         {"role": "assistant", "content": "Now the weather.",
          "tool_call": {"name": "get_current_weather", "parameters": {"location": "上海"}}},
         {"role": "environment", "name": "plugin", "content": "Traceback: KeyError: 'location'"},
         {"role": "assistant", "content": "The means are 1.5 and 2.0; the weather tool failed."}],
        [{"role": "system name=<|interpreter|>", "content": "You now have access to a Jupyter notebook."},
         {"role": "user", "content": "Please analyse this dataset.\n"},
         {"role": "user name=file", "content": '[{"path": "data.csv", "size": "10K"}]'},
         {"role": "assistant", "content": f"I will compute the means.\n\n<|action_start|><|interpreter|>\n{CODE}"
                                          "<|action_end|>\n"},
         {"role": "environment name=<|interpreter|>", "content": "a    1.5\nb    2.0\n"},
         {"role": "assistant", "content": "Now the weather.<|action_start|><|plugin|>\n"
                                          '{"name": "get_current_weather", "parameters": {"location": "上海"}}'
                                          "<|action_end|>"},
         {"role": "environment name=<|plugin|>", "content": "Traceback: KeyError: 'location'"},
         {"role": "assistant", "content": "The means are 1.5 and 2.0; the weather tool failed."}]),
}


@pytest.fixture(scope="module")
def reference(released_assets):
    from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

    return SentencePieceBackend.from_pretrained(released_assets, sp_model_kwargs={})


@pytest.fixture(scope="module", params=["with_config", "model_only"])
def tok(request, released_assets, tmp_path_factory):
    """Our tokenizer reading the folder (specials from tokenizer_config.json) or the bare model file."""
    if request.param == "with_config":
        return Tokenizer(released_assets)
    bare = tmp_path_factory.mktemp("bare") / "tokenizer.model"
    shutil.copy(f"{released_assets}/tokenizer.model", bare)
    return Tokenizer(bare)


def _reference_ids(reference, messages, add_generation_prompt=False):
    out = reference.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_encode_chat_equals_reference(tok, reference, name):
    ours, theirs = CONVERSATIONS[name]
    theirs = theirs or ours
    assert tok.encode_chat(ours) == _reference_ids(reference, theirs)
    prompt = ours[:-1] if ours[-1]["role"] == "assistant" else ours
    ref_prompt = theirs[:len(prompt)]
    assert tok.encode_chat(prompt, add_generation_prompt=True) == _reference_ids(reference, ref_prompt, True)


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_mask_covers_exactly_assistant_content_and_im_end(tok, name):
    ours, theirs = CONVERSATIONS[name]
    theirs = theirs or ours
    ids, mask = tok.encode_chat_with_mask(ours)
    runs, run = [], []
    for i, m in zip(ids + [None], mask + [False]):
        if m:
            run.append(i)
        elif run:
            runs, run = runs + [run], []
    expected = [m["content"] + "<|im_end|>" for m in theirs if m["role"] == "assistant"]
    assert len(runs) == len(expected)
    for run, text in zip(runs, expected):
        # A content starting with "\n" merges with the header's "\n" into one token (trained).
        assert tok.decode(run) in (text, "\n" + text), (tok.decode(run), text)
        assert run[-1] == 92542


def test_leading_newline_merges_like_the_reference(tok, reference):
    msgs = [{"role": "user", "content": "\nhi"}]
    ids = tok.encode_chat(msgs)
    assert ids == _reference_ids(reference, msgs)
    assert ids[:5] == [1, 92543, 1008, 402, 6176]  # "user", "\n\n", "hi": not "\n", "\n"


def test_special_ids(tok):
    assert {s: tok.special_ids[s] for s in ("<|plugin|>", "<|interpreter|>", "<|action_end|>", "<|action_start|>",
                                            "<|im_end|>", "<|im_start|>")} == {
        "<|plugin|>": 92538, "<|interpreter|>": 92539, "<|action_end|>": 92540, "<|action_start|>": 92541,
        "<|im_end|>": 92542, "<|im_start|>": 92543}
    assert (tok.special_ids["<unk>"], tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, 2)
    assert tok.vocab_size == 92544 and tok.stop_ids == (2, 92542)
    assert default_reward_token_id(tok) == 92527 and tok.sp.id_to_piece(92527) == "[UNUSED_TOKEN_130]"
    assert tok.encode("<unk>") == [0]
    assert tok.encode("a<s>b</s>") == tok.encode("a") + [1] + tok.encode("b") + [2]
    assert tok.decode([0, 1, 92543, 2]) == "<unk><s><|im_start|></s>"
    assert tok.decode([1, 92543, 2], skip_special=True) == ""


@pytest.mark.parametrize("text", [
    "  two leading spaces", "trailing newlines\n\n", "\n\n\nthree newlines first", "中文，标点！还有「引号」",
    "x<unk>y", "<s>inside</s>", "<|im_start|>user\nhi<|im_end|>\n", "emoji 😀🧿 and \u200bzero width",
    "\ttabs\tand  double  spaces ", "12345678901234567890", "e\u0301 combining", "a <|action_start|><|plugin|>\n{}",
    " ", "", "\r\nwindows\r\n",
])
def test_decode_encode_roundtrip(tok, reference, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert ids == reference.encode(text, add_special_tokens=False)
