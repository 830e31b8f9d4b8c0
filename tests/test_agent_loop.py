"""The tool loop without a model: plugins and their checks, malformed actions, the turn limit, the OpenAI
conversion (same prompt as in-process), and the spreadsheet example with a scripted model."""

import csv
import importlib.util
import json
import re

import pytest

from agent_scripted import ScriptedBackend
from internlm2_jax.agent import CALCULATOR, Agent, Plugin, SandboxLimits, call_plugin
from internlm2_jax.agent.backends import to_openai
from internlm2_jax.agent.plugins import calculate
from internlm2_jax.agent.protocol import parse_reply
from internlm2_jax.chat_format import render_chat
from internlm2_jax.serving.openai_chat import parse_tool_calls, render_prompt

CALC = '<|action_start|><|plugin|>\n{{"name": "calculator", "parameters": {{"expression": "{}"}}}}<|action_end|>'


@pytest.mark.parametrize("expression, value", [("4821*37", "178377"), ("(2+3)*-4", "-20"), ("7/2", "3.5"),
                                               ("2**100", str(2 ** 100)), ("10//3 + 10%3", "4")])
def test_calculator(expression, value):
    assert calculate(expression) == value


@pytest.mark.parametrize("params, error", [
    ({}, "missing required parameter(s): expression"),
    ({"expression": 3}, "parameter 'expression' must be string, got 3"),
    ({"expression": "1", "x": 1}, "unknown parameter 'x'"),
    ({"expression": "__import__('os')"}, "calculator raised ValueError: unsupported syntax"),
    ({"expression": "9**9**9"}, "calculator raised ValueError: exponent"),
])
def test_bad_calls_are_reported_not_raised(params, error):
    text, ok = call_plugin([CALCULATOR], "calculator", params)
    assert not ok and text.startswith("error: calculator") and error in text


def test_unknown_plugin_and_non_string_results():
    assert call_plugin([CALCULATOR], "search", {}) == ("error: unknown plugin 'search'; available: calculator", False)
    table = Plugin("table", "", {"type": "object", "properties": {}}, lambda: {"a": [1, 2]})
    assert call_plugin([table], "table", {}) == ('{"a": [1, 2]}', True)


@pytest.mark.parametrize("text, error", [
    ('<|action_start|><|plugin|>\n{"name": "calculator", "parameters": {', "could not read the action"),
    ('<|action_start|><|plugin|>\n{"name": "calculator"', "could not read the action"),  # cut at max tokens
    ('<|action_start|><|plugin|>\n{"parameters": {}}<|action_end|>', "could not read the action"),
])
def test_malformed_actions_become_environment_errors(text, error):
    msg, err = parse_reply(text)
    assert msg == {"role": "assistant", "content": text} and error in err
    run = Agent(ScriptedBackend([text, "sorry<|im_end|>"]), [CALCULATOR]).run("What is 2*3?")
    assert run.messages[-2]["role"] == "environment" and run.messages[-2]["content"].startswith("error: could not")
    assert (run.answer, run.tool_calls, run.tool_errors) == ("sorry", 1, 1)


def test_stops_after_max_turns():
    run = Agent(ScriptedBackend([CALC.format("1+1")] * 3), [CALCULATOR], max_turns=3).run("loop")
    assert run.stop == "max_turns" and run.answer is None and run.tool_calls == 3
    assert [m["content"] for m in run.messages if m["role"] == "environment"] == ["2", "2", "2"]


def test_openai_conversion_gives_the_same_prompt_and_calls():
    run = Agent(ScriptedBackend([CALC.format("4821*37"), CALC.format("178377+1"), "done<|im_end|>"]),
                [CALCULATOR], system="Be exact.").run("What is 4821*37 + 1?")
    for n in range(3, len(run.messages) + 1):
        conv = run.messages[:n]
        if conv[-1]["role"] == "assistant":
            continue
        messages, tools = to_openai(conv)
        assert render_prompt(messages, tools) == render_chat(conv, add_generation_prompt=True).text
    # and the server's parser reads the model's call as the agent does
    content, calls = parse_tool_calls(CALC.format("4821*37"))
    assert content == "" and json.loads(calls[0]["function"]["arguments"]) == {"expression": "4821*37"}
    with pytest.raises(ValueError, match="no interpreter turns"):
        to_openai([{"role": "system", "name": "interpreter", "content": "x"}])


SALES = [("north", "widget", 120.5), ("south", "widget", 80.0), ("north", "gadget", 40.25), ("east", "gadget", 99.0),
         ("south", "gizmo", 60.0)]
# What a model would write: pandas when the interpreter says it is there, else the csv module.
CODE = """try:
    import pandas as pd
    totals = pd.read_csv('sales.csv').groupby('region')['amount'].sum().to_dict()
except ImportError:
    import csv
    totals = {}
    for row in csv.DictReader(open('sales.csv', newline='')):
        totals[row['region']] = totals.get(row['region'], 0.0) + float(row['amount'])
for region, total in sorted(totals.items(), key=lambda kv: -kv[1]):
    print(f"{region}: {total:.2f}")"""


def _answer_from_output(conv):
    """The scripted model's answer quotes the numbers the interpreter printed."""
    lines = conv[-1]["content"].strip().splitlines()
    best, rest = lines[0], ", ".join(lines[1:])
    return f"The highest total is {best}; then {rest}.<|im_end|>"


def test_spreadsheet_analysis_quotes_the_computed_numbers(tmp_path):
    path = tmp_path / "sales.csv"
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([("region", "product", "amount"), *SALES])
    action = f"<|action_start|><|interpreter|>\n{CODE}<|action_end|>"
    backend = ScriptedBackend(["Let me total the sales by region." + action, _answer_from_output])
    run = Agent(backend, interpreter=SandboxLimits(timeout_s=30)).run("Which region sold the most?", [str(path)])
    expected = {}
    for region, _, amount in SALES:
        expected[region] = expected.get(region, 0.0) + amount
    assert run.stop == "answer" and run.tool_errors == 0
    intro = run.messages[0]["content"]
    assert ("pandas is installed" in intro) == (importlib.util.find_spec("pandas") is not None)
    printed = dict(re.findall(r"(\w+): ([\d.]+)", run.messages[-2]["content"]))
    assert {k: float(v) for k, v in printed.items()} == pytest.approx(expected)
    assert run.answer.startswith("The highest total is north: 160.75") and "south: 140.00" in run.answer
