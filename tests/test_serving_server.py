"""The OpenAI-compatible server (`internlm2_jax.serving.server`) through the official `openai` client on loopback.

References: the project's one-batch `generate` on the prompt `Tokenizer.encode_chat` builds (not the server's
own rendering), and each request served alone. Tool calls are checked end to end with a scripted engine that
emits a given model output (a random tiny model never writes one).
"""

from __future__ import annotations

import dataclasses
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import flax.linen as nn
import httpx
import jax
import openai
import pytest

from internlm2_jax import Tokenizer, get_preset, init_params
from internlm2_jax.data.tokenizer_training import train_tokenizer
from internlm2_jax.generate import generate
from internlm2_jax.serving.background import BackgroundServer
from internlm2_jax.serving.engine import Engine, EngineConfig, Event, QueueFull, SamplingParams
from internlm2_jax.serving.server import ServerConfig, create_app

WORDS = "hello there, how are you today? fine thanks. the weather in shanghai is warm."
CFG = get_preset("tiny", vocab_size=384, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, dtype="float32",
                 initializer_range=0.2)
QUESTIONS = [f"question {i}: how are you {'today ' * (i % 5)}?" for i in range(16)]


class Served(BackgroundServer):
    """The app on a free loopback port, with an `openai` client factory."""

    def client(self, **kw: Any) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=kw.pop("api_key", "none"), max_retries=0, **kw)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return Tokenizer(train_tokenizer([WORDS] * 50, str(tmp_path_factory.mktemp("tok") / "t"), vocab_size=384))


@pytest.fixture(scope="module")
def params():
    return nn.meta.unbox(init_params(CFG, jax.random.key(0)))


@pytest.fixture(scope="module")
def served(params, tokenizer):
    engine = Engine(CFG, params, EngineConfig(slots=8, max_len=128, prefill_chunk=32),
                    vocab_limit=tokenizer.vocab_size).start()
    srv = Served(create_app(engine, tokenizer, ServerConfig(model_name="tiny")))
    srv.engine = engine
    yield srv
    srv.close()
    engine.stop()


def _reference(params, tokenizer, question: str, max_tokens: int) -> str:
    prompt = tokenizer.encode_chat([{"role": "user", "content": question}], add_generation_prompt=True)
    out = generate(CFG, params, [prompt], max_new_tokens=max_tokens, stop_ids=tokenizer.stop_ids,
                   vocab_limit=tokenizer.vocab_size)[0]
    return tokenizer.decode([t for t in out if t not in tokenizer.stop_ids], skip_special=True)


def _chat(client: openai.OpenAI, question: str, **kw: Any):
    return client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": question}],
                                          temperature=0, max_tokens=kw.pop("max_tokens", 12), **kw)


def test_models_and_a_greedy_chat_completion(served, params, tokenizer):
    client = served.client()
    assert [m.id for m in client.models.list().data] == ["tiny"]
    r = _chat(client, QUESTIONS[0])
    assert r.choices[0].message.content == _reference(params, tokenizer, QUESTIONS[0], 12)
    prompt = tokenizer.encode_chat([{"role": "user", "content": QUESTIONS[0]}], add_generation_prompt=True)
    assert r.usage.prompt_tokens == len(prompt) and 1 <= r.usage.completion_tokens <= 12
    assert r.choices[0].finish_reason in ("stop", "length")


def test_streaming_equals_non_streaming(served):
    client = served.client()
    whole = _chat(client, QUESTIONS[3], max_tokens=20)
    parts = list(_chat(client, QUESTIONS[3], max_tokens=20, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in parts if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in parts if c.choices and c.choices[0].finish_reason] == \
        [whole.choices[0].finish_reason]
    assert parts[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_sixteen_concurrent_requests_each_equal_to_alone(served, params, tokenizer):
    client = served.client()
    alone = [_chat(client, q, max_tokens=16).choices[0].message.content for q in QUESTIONS]
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda q: _chat(client, q, max_tokens=16).choices[0].message.content, QUESTIONS))
    assert together == alone
    assert alone[5] == _reference(params, tokenizer, QUESTIONS[5], 16)


def test_completions_endpoint_and_stop_strings(served, tokenizer):
    client = served.client()
    full = client.completions.create(model="tiny", prompt="hello there", max_tokens=16, temperature=0,
                                     extra_body={"ignore_eos": True})
    text = full.choices[0].text
    assert full.usage.completion_tokens == 16 and full.choices[0].finish_reason == "length"
    stop = text[len(text) // 2:len(text) // 2 + 2]
    if stop.strip():
        cut = client.completions.create(model="tiny", prompt="hello there", max_tokens=16, temperature=0,
                                        stop=[stop], extra_body={"ignore_eos": True})
        assert cut.choices[0].text == text[:text.index(stop)] and cut.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("body, status, needle", [
    (b"{not json", 400, "not valid JSON"),
    (json.dumps({"messages": []}).encode(), 400, "messages"),
    (json.dumps({"messages": [{"role": "bot", "content": "hi"}]}).encode(), 400, "role"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}).encode(), 400, "temperature"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10_000}).encode(), 400, "context"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "n": 2}).encode(), 400, "n=1"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "model": "gpt-9"}).encode(), 404, "gpt-9"),
])
def test_malformed_requests_get_openai_errors_and_the_server_keeps_serving(served, body, status, needle):
    r = httpx.post(served.url + "/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status
    assert needle in r.json()["error"]["message"] and r.json()["error"]["type"]
    assert _chat(served.client(), QUESTIONS[1], max_tokens=2).choices[0].message is not None


def test_bad_request_through_the_client_is_a_400(served):
    with pytest.raises(openai.BadRequestError):
        served.client().chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])


def test_disconnect_mid_stream_frees_the_slot(served):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100, "stream": True, "ignore_eos": True,
            "temperature": 0}
    with httpx.stream("POST", served.url + "/v1/chat/completions", json=body) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(x.startswith("data: ") for x in got)
        assert served.engine.stats()["active"] == 1
    deadline = time.time() + 20
    while served.engine.stats()["active"] and time.time() < deadline:
        time.sleep(0.05)
    assert served.engine.stats()["active"] == 0
    assert httpx.get(served.url + "/health").json()["status"] == "ok"


# ---- a scripted engine: tool calls, timeouts, a full queue, API keys ------------------------------------------

@dataclasses.dataclass
class _Handle:
    cancelled: bool = False

    def cancel(self) -> None:
        self.cancelled = True


class ScriptedEngine:
    """Emits `tokens` (one per `delay` seconds) for every request; `full` makes submit raise QueueFull."""

    engine = EngineConfig(slots=1, max_len=4096)

    def __init__(self, tokens: list[int], delay: float = 0.0, full: bool = False):
        self.tokens, self.delay, self.full = tokens, delay, full

    def submit(self, prompt: list[int], sampling: SamplingParams, sink: Callable[[Event], None]) -> _Handle:
        if self.full:
            raise QueueFull("0 requests are waiting (max_queue 0)")
        handle = _Handle()

        def run() -> None:
            for t in self.tokens[:sampling.max_tokens]:
                time.sleep(self.delay)
                if handle.cancelled:
                    return sink(Event(finish_reason="cancelled"))
                sink(Event(token=t))
                if t in sampling.stop_ids:
                    return sink(Event(finish_reason="stop"))
            sink(Event(finish_reason="length"))

        threading.Thread(target=run, daemon=True).start()
        return handle

    def stats(self) -> dict[str, int]:
        return {"slots": 1, "active": 0, "queued": 0, "generated_tokens": 0}


TOOLS = [{"type": "function", "function": {"name": "get_current_weather", "description": "weather",
                                           "parameters": {"type": "object",
                                                          "properties": {"location": {"type": "string"}}}}}]


def test_plugin_call_in_the_output_becomes_tool_calls(tokenizer):
    said = 'the weather.<|action_start|><|plugin|>\n{"name": "get_current_weather", "parameters": ' \
           '{"location": "shanghai"}}<|action_end|>'
    srv = Served(create_app(ScriptedEngine(tokenizer.encode(said) + [tokenizer.im_end_id]), tokenizer,
                            ServerConfig(model_name="tiny")))
    try:
        client = srv.client()
        msgs = [{"role": "user", "content": "weather in shanghai?"}]
        r = client.chat.completions.create(model="tiny", messages=msgs, tools=TOOLS)
        call = r.choices[0].message.tool_calls[0]
        assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.content == "the weather."
        assert call.function.name == "get_current_weather"
        assert json.loads(call.function.arguments) == {"location": "shanghai"}
        chunks = list(client.chat.completions.create(model="tiny", messages=msgs, tools=TOOLS, stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == "the weather."
        streamed = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
        assert [tc.function.name for tc in streamed] == ["get_current_weather"]
        assert chunks[-1].choices[0].finish_reason == "tool_calls"
        # Without tools the same output is plain content (no parsing).
        plain = client.chat.completions.create(model="tiny", messages=msgs)
        assert plain.choices[0].message.tool_calls is None
    finally:
        srv.close()


def test_timeout_full_queue_and_api_key(tokenizer):
    slow = Served(create_app(ScriptedEngine([5] * 50, delay=0.2), tokenizer,
                             ServerConfig(model_name="tiny", request_timeout_s=0.5, api_key="k")))
    full = Served(create_app(ScriptedEngine([5], full=True), tokenizer, ServerConfig(model_name="tiny")))
    try:
        with pytest.raises(openai.AuthenticationError):
            _chat(slow.client(api_key="wrong"), "hi")
        with pytest.raises(openai.APIStatusError) as e:
            _chat(slow.client(api_key="k"), "hi", max_tokens=50)
        assert e.value.status_code == 504
        with pytest.raises(openai.RateLimitError):
            _chat(full.client(), "hi")
    finally:
        slow.close()
        full.close()


def test_serve_entry_point_answers_on_loopback(tmp_path, tokenizer):
    """`python -m experiments.serve --hf DIR` end to end: a saved HF folder (+ tokenizer) served and asked."""
    import os
    import shutil
    import subprocess
    import sys

    from internlm2_jax import save_hf

    hf = tmp_path / "hf"
    save_hf(CFG, nn.meta.unbox(init_params(CFG, jax.random.key(1))), hf)
    shutil.copy(tokenizer.path, hf / "tokenizer.model")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    proc = subprocess.Popen([sys.executable, "-m", "experiments.serve", "--hf", str(hf), "--port", str(port),
                             "--dtype", "float32", "--slots", "2", "--max-context", "128"],
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["hf"]
        r = client.chat.completions.create(model="hf", messages=[{"role": "user", "content": "hello"}],
                                           max_tokens=4, temperature=0)
        assert r.usage.completion_tokens >= 1
    finally:
        proc.terminate()
        err = proc.communicate(timeout=60)[1]
    assert "serving 'hf' on http://127.0.0.1" in err
    assert "chatcmpl-" in err and "completion=" in err  # one log line per request
