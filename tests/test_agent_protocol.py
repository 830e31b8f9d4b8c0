"""The agent's conversations against InternLM2's released tokenizer and chat template.

A scripted model emits raw text as InternLM2 would (actions included); the agent parses it, runs the tools and
builds the conversation. Its token ids (and every prompt it sends) must equal transformers' tokenizer with
`apply_chat_template` on the real template, fed the raw text the way chat_format.md writes it: the name in the
role string, the action inside the assistant content, `environment name=<|plugin|>` results.
"""

import json

import pytest

from agent_scripted import ScriptedBackend
# The reference tokenizer (fixture) and its chat-template ids, as the released-tokenizer tests build them.
from test_tokenizer_released import _reference_ids, reference  # noqa: F401
from internlm2_jax.agent import CALCULATOR, Agent, Plugin, SandboxLimits
from internlm2_jax.tokenizer import Tokenizer

pytest.importorskip("transformers")
pytest.importorskip("jinja2")


def _weather(city: str) -> str:
    return {"Shanghai": "22 C"}[city]  # anything else raises KeyError, as a flaky tool would


WEATHER = Plugin("weather", "Current weather of a city.",
                 {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}, _weather)
CALL = '<|action_start|><|plugin|>\n{{"name": "{}", "parameters": {}}}<|action_end|>'
SCRIPT = [
    "Let me compute it." + CALL.format("calculator", '{"expression": "4821*37"}'),
    CALL.format("weather", '{"city": "Shanghai"}'),
    "And Mars." + CALL.format("weather", '{"city": "火星"}'),
    "4821*37 = 178377; Shanghai is 22 C; the Mars lookup failed.<|im_end|>",
]
CODE = "import csv\nrows = list(csv.DictReader(open('t.csv')))\nlen(rows)"
SCRIPT_CODE = ["I will count the rows.\n<|action_start|><|interpreter|>\n" + CODE + "<|action_end|>",
               "The file has 2 rows.<|im_end|>"]


@pytest.fixture(scope="module")
def tok(released_assets):
    return Tokenizer(released_assets)


def _as_reference(messages, script):
    """The conversation as chat_format.md writes it, from the raw model text (not from our renderer)."""
    names = {"plugin": "<|plugin|>", "interpreter": "<|interpreter|>", "file": "file"}
    out, turn = [], 0
    for m in messages:
        role = m["role"] + (f" name={names[m['name']]}" if m.get("name") else "")
        content = m["content"]
        if m["role"] == "assistant":
            content = script[turn].removesuffix("<|im_end|>")
            if content.endswith("<|interpreter|>\n" + CODE + "<|action_end|>"):
                content += "\n"  # chat_format.md: an interpreter action ends "<|action_end|>\n"
            turn += 1
        out.append({"role": role, "content": content})
    return out


def _check(tok, reference, backend, run, script):
    ref = _as_reference(run.messages, script)
    assert tok.encode_chat(run.messages) == _reference_ids(reference, ref)
    for sent in backend.seen:  # every prompt the model saw
        n = len(sent)
        assert tok.encode_chat(sent, add_generation_prompt=True) == _reference_ids(reference, ref[:n], True)


def test_plugin_calls_and_a_raising_tool_match_the_reference(tok, reference):
    backend = ScriptedBackend(SCRIPT)
    agent = Agent(backend, [CALCULATOR, WEATHER], system="You are InternLM2-Chat.")
    run = agent.run("What is 4821*37, and the weather in Shanghai and on Mars?")
    env = [m["content"] for m in run.messages if m["role"] == "environment"]
    assert env == ["178377", "22 C", "error: weather raised KeyError: '火星'"]
    assert run.answer.startswith("4821*37 = 178377") and run.stop == "answer"
    assert (run.tool_calls, run.tool_errors) == (3, 1)
    tools = json.loads(run.messages[1]["content"])
    assert [t["name"] for t in tools] == ["calculator", "weather"] and run.messages[1]["name"] == "plugin"
    _check(tok, reference, backend, run, SCRIPT)


def test_interpreter_and_file_turns_match_the_reference(tok, reference, tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("a,b\n1,2\n3,4\n")
    backend = ScriptedBackend(SCRIPT_CODE)
    run = Agent(backend, [CALCULATOR], SandboxLimits(timeout_s=20)).run("How many rows?", [str(path)])
    assert [m["role"] + ":" + str(m.get("name")) for m in run.messages] == [
        "system:plugin", "system:interpreter", "user:None", "user:file", "assistant:None",
        "environment:interpreter", "assistant:None"]
    assert run.messages[-2]["content"] == "2\n" and run.answer == "The file has 2 rows."
    assert json.loads(run.messages[3]["content"]) == [{"path": "t.csv", "size": "12 B"}]
    _check(tok, reference, backend, run, SCRIPT_CODE)
