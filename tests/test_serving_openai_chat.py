"""OpenAI chat requests → InternLM2 prompts, and InternLM2 tool-call output → OpenAI `tool_calls`.

References: InternLM's chat/chat_format.md function-call example (written out by hand below, with the
tool list as `json.dumps(indent=4)`), and the internlm2-chat Jinja `chat_template` for plain turns.
"""

import json
import os

import pytest

from internlm2_jax.chat_format import render_chat
from internlm2_jax.serving.openai_chat import parse_tool_calls, render_prompt, to_internlm2

WEATHER = {
    "name": "get_current_weather",
    "description": "Get the current weather in a given location",
    "parameters": {
        "type": "object",
        "properties": {
            "location": {"type": "string", "description": "The city and state, e.g. San Francisco, CA"},
            "unit": {"type": "string"},
        },
        "required": ["location"],
    },
}

DOC_REQUEST = [
    {"role": "system", "content": "You are InternLM2-Chat, a harmless AI assistant"},
    {"role": "user", "content": "I want to know today's weather in Shanghai"},
    {"role": "assistant", "content": "Sure, I will search for the weather of Shanghai.",
     "tool_calls": [{"id": "call_1", "type": "function",
                     "function": {"name": "get_current_weather", "arguments": '{"location": "Shanghai"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 22}'},
    {"role": "assistant", "content": "The weather in Shanghai is 22 celsius"},
]

# chat_format.md's function-call example, typed by hand (tool list in json.dumps(indent=4) layout).
DOC_TEXT = """<s><|im_start|>system
You are InternLM2-Chat, a harmless AI assistant<|im_end|>
<|im_start|>system name=<|plugin|>
[
    {
        "name": "get_current_weather",
        "description": "Get the current weather in a given location",
        "parameters": {
            "type": "object",
            "properties": {
                "location": {
                    "type": "string",
                    "description": "The city and state, e.g. San Francisco, CA"
                },
                "unit": {
                    "type": "string"
                }
            },
            "required": [
                "location"
            ]
        }
    }
]
<|im_end|>
<|im_start|>user
I want to know today's weather in Shanghai<|im_end|>
<|im_start|>assistant
Sure, I will search for the weather of Shanghai.<|action_start|><|plugin|>
{"name": "get_current_weather", "parameters": {"location": "Shanghai"}}<|action_end|><|im_end|>
<|im_start|>environment name=<|plugin|>
{"temperature": 22}<|im_end|>
<|im_start|>assistant
The weather in Shanghai is 22 celsius<|im_end|>
<|im_start|>assistant
"""

TOOLS = [{"type": "function", "function": WEATHER}]


def test_doc_function_call_example_renders_exactly():
    assert render_prompt(DOC_REQUEST, TOOLS, "auto") == DOC_TEXT
    assert render_prompt(DOC_REQUEST, TOOLS, None) == DOC_TEXT


def test_tools_turn_placement_and_tool_choice_none():
    no_system = DOC_REQUEST[1:2]
    msgs = to_internlm2(no_system, TOOLS, None)
    assert [(m["role"], m.get("name")) for m in msgs] == [("system", "plugin"), ("user", None)]
    two_systems = [{"role": "system", "content": "a"}, {"role": "developer", "content": "b"}] + no_system
    assert [m.get("name") for m in to_internlm2(two_systems, TOOLS, None)] == [None, None, "plugin", None]
    plain = render_prompt(DOC_REQUEST, TOOLS, "none")
    assert "name=<|plugin|>\n[" not in plain and "<|action_start|><|plugin|>" in plain  # history still renders
    assert render_prompt(DOC_REQUEST, None, None) == plain
    # OpenAI's `strict` is not part of InternLM2's function list.
    strict = [{"type": "function", "function": {**WEATHER, "strict": True}}]
    assert render_prompt(DOC_REQUEST, strict, "auto") == DOC_TEXT


def test_several_calls_interleave_with_their_results():
    calls = [{"id": f"c{k}", "type": "function", "function": {"name": "f", "arguments": json.dumps({"k": k})}}
             for k in range(3)]
    msgs = [{"role": "user", "content": "go"},
            {"role": "assistant", "content": "Calling.", "tool_calls": calls},
            {"role": "tool", "tool_call_id": "c1", "content": "one"},  # results out of order, c2 missing
            {"role": "tool", "tool_call_id": "c0", "content": "zero"}]
    assert to_internlm2(msgs, None, None)[1:] == [
        {"role": "assistant", "content": "Calling.", "tool_call": {"name": "f", "parameters": {"k": 0}}},
        {"role": "environment", "name": "plugin", "content": "zero"},
        {"role": "assistant", "content": "", "tool_call": {"name": "f", "parameters": {"k": 1}}},
        {"role": "environment", "name": "plugin", "content": "one"},
        {"role": "assistant", "content": "", "tool_call": {"name": "f", "parameters": {"k": 2}}},
    ]


def test_content_parts_and_none():
    msgs = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            {"role": "assistant", "content": None},
            {"role": "tool", "content": [{"type": "text", "text": "r"}]}]
    assert [m["content"] for m in to_internlm2(msgs, None, None)] == ["a\nb", "", "r"]


@pytest.mark.parametrize("msgs,tools,choice,match", [
    ([{"role": "function", "content": "x"}], None, None, r"messages\[0\]\.role: unknown role 'function'"),
    ([{"role": "user", "content": "hi"},
      {"role": "user", "content": [{"type": "text", "text": "see"},
                                   {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}],
     None, None, r"messages\[1\]\.content\[1\]: part type 'image_url' is not supported"),
    ([{"role": "user", "content": "hi"}, {"role": "tool", "tool_call_id": "c"}], None, None,
     r"messages\[1\]\.content: missing"),
    ([{"role": "user", "content": "hi"},
      {"role": "assistant", "tool_calls": [{"id": "c", "type": "function",
                                            "function": {"name": "f", "arguments": '{"a": 1'}}]}],
     None, None, r"messages\[1\]\.tool_calls\[0\]\.function\.arguments: not valid JSON"),
    ([{"role": "user", "content": "hi"},
      {"role": "assistant", "tool_calls": [{"id": "c", "type": "function",
                                            "function": {"name": "f", "arguments": "[1]"}}]},
      {"role": "tool", "tool_call_id": "c", "content": "x"}],
     None, None, r"messages\[1\]\.tool_calls\[0\]\.function\.arguments: must be a JSON object"),
    ([{"role": "user", "content": "hi"},
      {"role": "assistant", "tool_calls": [{"id": "c", "type": "function",
                                            "function": {"name": "f", "arguments": "{}"}}]},
      {"role": "tool", "tool_call_id": "zz", "content": "x"}],
     None, None, r"messages\[2\]\.tool_call_id: 'zz' matches no tool call of messages\[1\]"),
    ([{"role": "user", "content": "hi"}], TOOLS, "required", r"tool_choice: \"required\" is not supported"),
    ([{"role": "user", "content": "hi"}], TOOLS, {"type": "function", "function": {"name": "get_current_weather"}},
     r"tool_choice: .* is not supported"),
    ([{"role": "user", "content": "hi"}], TOOLS, "sometimes", r"tool_choice: unknown value"),
    ([{"role": "user", "content": "hi"}], [{"type": "function", "function": {"description": "d"}}], None,
     r"tools\[0\]\.function\.name"),
    ([{"role": "user", "content": 5}], None, None, r"messages\[0\]\.content: must be a string"),
    ([], None, None, r"messages: must be a non-empty list"),
])
def test_bad_requests_name_the_field(msgs, tools, choice, match):
    with pytest.raises(ValueError, match=match):
        to_internlm2(msgs, tools, choice)


CALL = '<|action_start|><|plugin|>\n{"name": "get_current_weather", "parameters": {"location": "上海"}}<|action_end|>'


def test_parse_plain_text():
    assert parse_tool_calls("Hello there.\n") == ("Hello there.\n", [])
    assert parse_tool_calls("Hello there.<|im_end|>") == ("Hello there.", [])
    assert parse_tool_calls("Hello</s>") == ("Hello", [])


def test_parse_one_call_with_text_before():
    content, calls = parse_tool_calls("Sure, I will search." + CALL + "<|im_end|>")
    assert content == "Sure, I will search."
    assert len(calls) == 1 and calls[0]["id"].startswith("call_") and calls[0]["type"] == "function"
    assert calls[0]["function"] == {"name": "get_current_weather", "arguments": '{"location": "上海"}'}


def test_parse_arguments_key_and_several_calls_get_unique_ids():
    text = CALL + "\n" + '<|action_start|><|plugin|>\n{"name": "f", "arguments": {"x": [1, 2]}}<|action_end|>\n</s>'
    content, calls = parse_tool_calls(text)
    assert content == "" and [c["function"]["name"] for c in calls] == ["get_current_weather", "f"]
    assert json.loads(calls[1]["function"]["arguments"]) == {"x": [1, 2]}
    assert len({c["id"] for c in calls}) == 2
    assert parse_tool_calls(CALL)[1][0]["id"] != parse_tool_calls(CALL)[1][0]["id"]


@pytest.mark.parametrize("text", [
    'Let me check.<|action_start|><|plugin|>\n{"name": "f", "parameters": {"x": 1}<|action_end|>',  # bad JSON
    "<|action_start|><|plugin|>\n[1, 2]<|action_end|>",  # not an object
    '<|action_start|><|plugin|>\n{"parameters": {}}<|action_end|>',  # no name
    '<|action_start|><|plugin|>\n{"name": "f", "parameters": {"x": 1}}',  # unterminated
    CALL + " and more text",  # text after the call
    "I will compute.\n\n<|action_start|><|interpreter|>\n```python\nprint(1)\n```<|action_end|>\n",  # interpreter
])
def test_parse_unusable_actions_come_back_as_content(text):
    assert parse_tool_calls(text + "<|im_end|>") == (text, [])


# ---- against the released internlm2-chat template and tokenizer (INTERNLM2_ASSETS) --------------------------

PLAIN = [
    {"role": "developer", "content": "You are InternLM2-Chat, a harmless AI assistant"},
    {"role": "user", "content": [{"type": "text", "text": "你好，"}, {"type": "text", "text": " 12345 + 67890?"}]},
    {"role": "assistant", "content": "80235。"},
    {"role": "user", "content": "\nThanks! <unk> and trailing  "},
]
# The same conversation as the Jinja template expects it, by hand.
PLAIN_REFERENCE = [
    {"role": "system", "content": "You are InternLM2-Chat, a harmless AI assistant"},
    {"role": "user", "content": "你好，\n 12345 + 67890?"},
    {"role": "assistant", "content": "80235。"},
    {"role": "user", "content": "\nThanks! <unk> and trailing  "},
]


@pytest.fixture(scope="module")
def chat_template(released_assets):
    jinja2 = pytest.importorskip("jinja2", reason="jinja2 is not installed: no reference chat_template rendering")
    with open(os.path.join(released_assets, "tokenizer_config.json"), encoding="utf-8") as f:
        config = json.load(f)
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)  # as transformers renders chat templates
    return env.from_string(config["chat_template"]), config["bos_token"]


def test_plain_prompt_equals_released_chat_template(chat_template, released_assets):
    from internlm2_jax.tokenizer import Tokenizer

    template, bos = chat_template
    expected = template.render(messages=PLAIN_REFERENCE, bos_token=bos, add_generation_prompt=True)
    prompt = render_prompt(PLAIN, None, None)
    assert prompt == expected
    tok = Tokenizer(released_assets)
    ids = tok.encode(prompt)
    assert ids == tok.encode(expected)
    assert ids == tok.encode_chat(PLAIN_REFERENCE, add_generation_prompt=True)
    tail = tok.encode("<|im_start|>assistant\n")
    assert ids[:2] == [tok.bos_id, tok.im_start_id] and ids[-len(tail):] == tail
    assert render_chat(to_internlm2(PLAIN, None, None), add_generation_prompt=True).text == prompt
