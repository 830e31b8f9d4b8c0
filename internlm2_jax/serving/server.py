"""OpenAI-compatible HTTP API over the continuous-batching `Engine` (FastAPI; run it with uvicorn).

    GET  /health                 {"status": "ok", slots, active, queued, generated_tokens}
    GET  /v1/models              the one served model
    POST /v1/chat/completions    messages (+ tools) → InternLM2 chat prompt; stream or not; `usage`
    POST /v1/completions         a plain prompt (BOS prepended); stream or not; `usage`

Request fields used: model, messages / prompt, max_tokens (or max_completion_tokens), temperature, top_p,
top_k, seed, stop (string or list), stream, stream_options.include_usage, tools, tool_choice, n (1 only),
and `ignore_eos` (generate exactly max_tokens; for benchmarks). Errors come back as OpenAI error bodies
`{"error": {"message", "type", "param", "code"}}`: 400 bad request, 401 bad API key, 404 unknown model,
429 queue full, 504 past the per-request timeout. A client that disconnects frees its slot at once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import threading
import time
import uuid
import weakref
from typing import Any, AsyncIterator, Optional

from fastapi import FastAPI, Request as HttpRequest
from fastapi.responses import JSONResponse, StreamingResponse

from internlm2_jax.serving.engine import Engine, Event, QueueFull, SamplingParams
from internlm2_jax.serving.openai_chat import parse_tool_calls, render_prompt
from internlm2_jax.serving.text_stream import TextStream
from internlm2_jax.tokenizer import Tokenizer

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """HTTP-side settings."""

    model_name: str = "internlm2"
    """The id `/v1/models` lists and requests must name (or omit)."""
    api_key: Optional[str] = None
    """When set, requests need `Authorization: Bearer <api_key>`."""
    request_timeout_s: float = 600.0
    """A request still running after this long is cancelled (504, or an error event when streaming)."""
    default_max_tokens: int = 256
    """max_tokens when a request gives none (capped by what fits the engine's context)."""


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}
        return JSONResponse(body, status_code=self.status)


def _number(body: dict, name: str, kind: type, default: Any) -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
        raise ApiError(400, f"'{name}' must be a {'integer' if kind is int else 'number'}, got {value!r}",
                       param=name)
    return kind(value)


def _stops(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) for s in stop):
        raise ApiError(400, "'stop' must be a string or a list of at most 4 strings", param="stop")
    return stop


class _Mailbox:
    """Engine-thread events → asyncio queues with one event-loop wake-up per burst.

    An engine step emits one event per active request; a `call_soon_threadsafe` for each would wake the loop
    (a pipe write and a loop iteration) that many times per step.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop, self._lock, self._items = loop, threading.Lock(), []

    def post(self, queue: asyncio.Queue, ev: Event) -> None:
        with self._lock:
            self._items.append((queue, ev))
            wake = len(self._items) == 1
        if wake:
            try:
                self._loop.call_soon_threadsafe(self._deliver)
            except RuntimeError:  # the loop is closed (server shut down): nobody is waiting any more
                pass

    def _deliver(self) -> None:
        with self._lock:
            items, self._items = self._items, []
        for queue, ev in items:
            queue.put_nowait(ev)


def create_app(engine: Engine, tokenizer: Tokenizer, config: ServerConfig = ServerConfig()) -> FastAPI:
    """The FastAPI app; the engine must be started (`engine.start()`)."""
    app = FastAPI(title="internlm2-jax", docs_url=None, redoc_url=None)
    end_ids = tuple(tokenizer.stop_ids)
    mailboxes: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Mailbox]" = weakref.WeakKeyDictionary()
    action_end = tokenizer.special_ids.get("<|action_end|>")

    def check(http: HttpRequest, body: dict) -> None:
        if config.api_key is not None and http.headers.get("authorization") != f"Bearer {config.api_key}":
            raise ApiError(401, "invalid or missing API key (Authorization: Bearer ...)", "authentication_error")
        model = body.get("model")
        if model is not None and model != config.model_name:
            raise ApiError(404, f"model {model!r} is not served here; this server serves {config.model_name!r}",
                           param="model")
        if body.get("n", 1) != 1:
            raise ApiError(400, "only n=1 is supported", param="n")

    def sampling(body: dict, prompt_len: int, stop_ids: tuple[int, ...]) -> SamplingParams:
        room = engine.engine.max_len - prompt_len
        given = body.get("max_completion_tokens", body.get("max_tokens"))
        max_tokens = _number({"max_tokens": given}, "max_tokens", int, min(config.default_max_tokens, room))
        seed = body.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ApiError(400, f"'seed' must be an integer, got {seed!r}", param="seed")
        return SamplingParams(max_tokens=max_tokens, temperature=_number(body, "temperature", float, 1.0),
                              top_p=_number(body, "top_p", float, 1.0), top_k=_number(body, "top_k", int, 0),
                              stop_ids=() if body.get("ignore_eos") else stop_ids, seed=seed)

    async def parse(http: HttpRequest) -> dict:
        try:
            body = await http.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON ({e})")
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        check(http, body)
        return body

    async def run(kind: str, http: HttpRequest, prompt: list[int], params: SamplingParams, stream: TextStream,
                  body: dict) -> Any:
        """Submits and returns the response (a JSON dict, or a StreamingResponse)."""
        loop = asyncio.get_running_loop()
        mailbox = mailboxes.setdefault(loop, _Mailbox(loop))
        queue: asyncio.Queue[Event] = asyncio.Queue()
        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        t0, created = time.monotonic(), int(time.time())
        try:
            req = engine.submit(prompt, params, lambda ev: mailbox.post(queue, ev))
        except QueueFull as e:
            raise ApiError(429, f"server busy: {e}; retry later", "rate_limit_error")
        except ValueError as e:
            raise ApiError(400, str(e))
        deadline = t0 + config.request_timeout_s
        first: list[float] = []

        async def batches() -> AsyncIterator[list[Event]]:
            """The request's events in the bursts they arrived in (under load, several tokens per chunk)."""
            while True:
                evs = []
                if queue.empty():  # wait_for (a task and a timer) only when there is something to wait for
                    try:
                        evs.append(await asyncio.wait_for(queue.get(), max(0.0, deadline - time.monotonic())))
                    except asyncio.TimeoutError:
                        req.cancel()
                        yield [Event(finish_reason="timeout")]
                        return
                while not queue.empty():
                    evs.append(queue.get_nowait())
                if not first and any(ev.token is not None for ev in evs):
                    first.append(time.monotonic() - t0)
                yield evs
                if evs[-1].finish_reason is not None:
                    return

        def finish_reason(ev: Event, calls: list) -> str:
            if calls:
                return "tool_calls"
            if stream.stopped or ev.finish_reason == "stop":
                return "stop"
            return ev.finish_reason or "stop"

        def usage() -> dict[str, int]:
            return {"prompt_tokens": len(prompt), "completion_tokens": len(stream.ids),
                    "total_tokens": len(prompt) + len(stream.ids)}

        def log_line(reason: str) -> None:
            ttft = f"{first[0]:.3f}s" if first else "-"
            log.info("%s %s prompt=%d completion=%d finish=%s ttft=%s total=%.3fs", rid, kind, len(prompt),
                     len(stream.ids), reason, ttft, time.monotonic() - t0)

        def chunk(delta: Optional[str], reason: Optional[str] = None, calls: Optional[list] = None,
                  first: bool = False) -> str:
            if kind == "chat":
                d: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
                if delta is not None:
                    d["content"] = delta
                if calls:
                    d["tool_calls"] = [{"index": n, **c} for n, c in enumerate(calls)]
                choice = {"index": 0, "delta": d, "finish_reason": reason, "logprobs": None}
                obj = "chat.completion.chunk"
            else:
                choice = {"index": 0, "text": delta or "", "finish_reason": reason, "logprobs": None}
                obj = "text_completion"
            return "data: " + json.dumps({"id": rid, "object": obj, "created": created, "model": config.model_name,
                                          "choices": [choice]}, ensure_ascii=False) + "\n\n"

        def tools_of(final: str) -> tuple[Optional[str], list]:
            if not stream.tools:
                return final, []
            content, calls = parse_tool_calls(stream.text)
            return (content if calls else final), calls

        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

            async def sse() -> AsyncIterator[str]:
                reason = "cancelled"
                try:
                    if kind == "chat":
                        yield chunk(None, first=True)
                    async for evs in batches():
                        delta = "".join(stream.push(ev.token) for ev in evs if ev.token is not None)
                        if stream.stopped:
                            req.cancel()
                        if delta:
                            yield chunk(delta)
                        ev = evs[-1]
                        if ev.finish_reason is not None:
                            if ev.finish_reason in ("timeout", "error"):
                                reason = ev.finish_reason
                                msg = "request timed out" if reason == "timeout" else ev.error
                                yield "data: " + json.dumps({"error": {"message": msg, "type": "server_error",
                                                                       "param": None, "code": None}}) + "\n\n"
                                break
                            rest = stream.finish()
                            _, calls = tools_of(stream.shown)
                            reason = finish_reason(ev, calls)
                            if rest:
                                yield chunk(rest)
                            yield chunk(None, reason, calls)
                            if include_usage:
                                yield "data: " + json.dumps({"id": rid, "object": "chat.completion.chunk",
                                                             "created": created, "model": config.model_name,
                                                             "choices": [], "usage": usage()}) + "\n\n"
                            break
                    yield "data: [DONE]\n\n"
                finally:  # a disconnect cancels this generator: free the slot
                    req.cancel()
                    log_line(reason)

            return StreamingResponse(sse(), media_type="text/event-stream")

        last = Event(finish_reason="cancelled")
        try:
            async for evs in batches():
                for ev in evs:
                    if ev.token is not None:
                        stream.push(ev.token)
                if stream.stopped:
                    req.cancel()
                last = evs[-1]
        finally:  # the client went away while waiting (the task is cancelled): free the slot
            req.cancel()
        if last.finish_reason == "timeout":
            log_line("timeout")
            raise ApiError(504, f"request timed out after {config.request_timeout_s:g}s", "timeout_error")
        if last.finish_reason == "error":
            log_line("error")
            raise ApiError(500, f"generation failed: {last.error}", "server_error")
        content, calls = tools_of(stream.full_content())
        reason = finish_reason(last, calls)
        log_line(reason)
        if kind == "chat":
            message: dict[str, Any] = {"role": "assistant", "content": content}
            if calls:
                message["tool_calls"] = calls
            choice = {"index": 0, "message": message, "finish_reason": reason, "logprobs": None}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": content, "finish_reason": reason, "logprobs": None}
            obj = "text_completion"
        return {"id": rid, "object": obj, "created": created, "model": config.model_name, "choices": [choice],
                "usage": usage()}

    @app.exception_handler(ApiError)
    async def _api_error(_: HttpRequest, e: ApiError) -> JSONResponse:
        log.info("rejected (%d): %s", e.status, e.message)
        return e.response()

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", **engine.stats()}

    @app.get("/v1/models")
    async def models(http: HttpRequest) -> dict:
        check(http, {})
        return {"object": "list", "data": [{"id": config.model_name, "object": "model", "created": 0,
                                            "owned_by": "internlm2-jax"}]}

    @app.post("/v1/chat/completions")
    async def chat(http: HttpRequest) -> Any:
        body = await parse(http)
        messages, tools = body.get("messages"), body.get("tools")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "'messages' must be a non-empty list", param="messages")
        try:
            text = render_prompt(messages, tools, body.get("tool_choice"))
        except ValueError as e:
            raise ApiError(400, str(e), param="messages")
        with_tools = bool(tools) and body.get("tool_choice") != "none"
        prompt = tokenizer.encode(text)
        stop_ids = end_ids + ((action_end,) if with_tools and action_end is not None else ())
        params = sampling(body, len(prompt), stop_ids)
        # The action's closing token is kept in the text (the parser reads it); the others end the content.
        stream = TextStream(tokenizer, _stops(body), tools=with_tools, end_ids=end_ids)
        return await run("chat", http, prompt, params, stream, body)

    @app.post("/v1/completions")
    async def completions(http: HttpRequest) -> Any:
        body = await parse(http)
        prompt_text = body.get("prompt")
        if isinstance(prompt_text, list) and len(prompt_text) == 1:
            prompt_text = prompt_text[0]
        if not isinstance(prompt_text, str) or not prompt_text:
            raise ApiError(400, "'prompt' must be a non-empty string", param="prompt")
        prompt = tokenizer.encode(prompt_text, add_bos=True, allow_special=False)
        params = sampling(body, len(prompt), end_ids)
        stream = TextStream(tokenizer, _stops(body), end_ids=end_ids)
        return await run("completion", http, prompt, params, stream, body)

    return app
