"""The tool-use task end to end: generated records, the project's SFT on them, and the agent loop running the
trained model in-process. The default test runs a few steps (the loop must run, whatever the model says); the
slow one trains `experiments/configs/sft/tiny_tools.gin` and needs >= 90 % of held-out questions answered
through the loop with the calculator actually run, and clearly less without tools."""

import json
import os

import gin
import pytest

from internlm2_jax.agent import CALCULATOR, Agent, LocalBackend
from internlm2_jax.agent.tool_task import evaluate, read_questions
from internlm2_jax.chat_format import render_chat
from internlm2_jax.gin_setup import parse_gin
from internlm2_jax.sft.formats import load_conversations, parse_chatml
from internlm2_jax.sft.tasks import write_task
from internlm2_jax.sft.train import sft_train

ROOT = os.path.dirname(os.path.dirname(__file__))
TOOLS_GIN = os.path.join(ROOT, "experiments", "configs", "sft", "tiny_tools.gin")


def _sft(workdir, *bindings):
    gin.clear_config()
    gin.add_config_file_search_path(ROOT)
    parse_gin([TOOLS_GIN], ["sft_train.progress = False", "sft_train.export_hf = True", *bindings])
    last = sft_train(str(workdir))
    from internlm2_jax import Tokenizer, load_hf

    config, params = load_hf(os.path.join(workdir, "hf"), dtype="float32")
    return last, config, params, Tokenizer(os.path.join(workdir, "hf", "tokenizer.model"))


def test_records_are_the_agents_turns(tmp_path):
    paths = write_task(str(tmp_path), "calculator", 300, 30)
    train = [json.loads(line) for line in open(paths["train"])]
    held = read_questions(paths["eval"])
    assert not {r["question"] for r in train} & {q for q, _ in held}
    for r in train[:50]:
        messages = parse_chatml(r["text"])
        assert render_chat(messages).text == r["text"]  # ChatML round trip: the SFT loader sees these turns
        a, b = map(int, r["question"].removeprefix("What is ").removesuffix("?").split("*"))
        assert messages[-1]["content"] == r["answer"] == str(a * b)
        if r["tools"]:
            call = messages[2]["tool_call"]
            assert call == {"name": "calculator", "parameters": {"expression": f"{a}*{b}"}}
            assert messages[3] == {"role": "environment", "name": "plugin", "content": str(a * b)}
            # the prompt the agent builds for this question is the record's prefix
            start = Agent(None, [CALCULATOR]).start(r["question"])
            assert render_chat(start.messages).text == render_chat(messages[:2]).text
    assert 0.6 < sum(r["tools"] for r in train) / len(train) < 0.9
    assert len(load_conversations(paths["train"]).conversations) == 300


@pytest.fixture(scope="module")
def few_steps(tmp_path_factory):
    """A 2-layer model after 3 SFT steps on the task (exported to `workdir/hf`)."""
    workdir = tmp_path_factory.mktemp("tools_sft")
    return (workdir, *_sft(workdir, "sft_train.task_sizes = (64, 8)", "sft_train.num_steps = 3",
                           "model_config.hidden_size = 64", "model_config.intermediate_size = 176",
                           "model_config.num_hidden_layers = 2", "sft_train.eval_max_examples = 0",
                           "sft_train.checkpoint_every = 100"))


def test_a_few_sft_steps_then_the_loop_runs_the_model(few_steps):
    _, _, config, params, tok = few_steps
    backend = LocalBackend(config, params, tok, max_new_tokens=24)
    runs = Agent(backend, [CALCULATOR], max_turns=2).run_batch(["What is 4821*37?", "What is 123*45?"])
    assert backend.calls >= 1
    for run in runs:
        assert run.stop in ("answer", "max_turns")
        assert run.messages[0]["name"] == "plugin" and run.messages[1]["content"].startswith("What is")
        assert tok.encode_chat(run.messages)  # whatever the model wrote renders back


def test_cli_shows_the_turns_and_reports_errors_in_one_line(few_steps, capsys, tmp_path):
    from experiments.agent import main

    hf = str(few_steps[0] / "hf")
    assert main(["--hf", hf, "--dtype", "float32", "--plugin", "calculator", "--max-turns", "2",
                 "--max-new-tokens", "16", "What is 12*34?"]) == 0
    out = capsys.readouterr().out
    assert "<|im_start|>user\nWhat is 12*34?<|im_end|>" in out and "<|im_start|>assistant\n" in out
    assert json.loads(out.strip().splitlines()[-1])["stop"] in ("answer", "max_turns")
    assert main(["--hf", hf, "--file", str(tmp_path / "missing.csv"), "hi"]) == 2
    assert capsys.readouterr().err.strip().endswith("missing.csv: no such file")


@pytest.mark.slow
@pytest.mark.outcome
def test_tool_use_reaches_90_percent_through_the_agent(tmp_path, seed):
    last, config, params, tok = _sft(tmp_path, f"sft_train.seed = {seed}")
    pairs = read_questions(os.path.join(tmp_path, "data", "eval.jsonl"))
    backend = LocalBackend(config, params, tok, max_new_tokens=40)
    with_tools = evaluate(Agent(backend, [CALCULATOR], max_turns=3), pairs)
    without = evaluate(Agent(backend, max_turns=3), pairs)
    print(f"seed {seed}: with tools {with_tools}, without {without}, sft {last.get('eval_exact_match')}")
    assert with_tools["accuracy"] >= 0.9 and with_tools["solved_with_tool"] >= 0.9, with_tools
    assert without["accuracy"] <= with_tools["accuracy"] - 0.5, (with_tools, without)
    # The same checkpoint behind the project's OpenAI-compatible server: the loop through its chat endpoint.
    from internlm2_jax.agent import OpenAIBackend
    from internlm2_jax.serving.background import BackgroundServer
    from internlm2_jax.serving.engine import Engine, EngineConfig
    from internlm2_jax.serving.server import ServerConfig, create_app

    engine = Engine(config, params, EngineConfig(slots=8, max_len=256, prefill_chunk=256),
                    vocab_limit=tok.vocab_size).start()
    server = BackgroundServer(create_app(engine, tok, ServerConfig(model_name="tools")))
    try:
        remote = OpenAIBackend(server.url + "/v1", max_tokens=40)
        served = evaluate(Agent(remote, [CALCULATOR], max_turns=3), pairs[:40])
    finally:
        server.close()
        engine.stop()
    print(f"seed {seed}: through the server {served}")
    assert served["solved_with_tool"] >= 0.9, served
