"""Where the agent's model turns come from: in-process generation, or an OpenAI-compatible chat server.

`LocalBackend` encodes each conversation with `Tokenizer.encode_chat` (+ the `<|im_start|>assistant\\n`
prompt), generates a batch with `internlm2_jax.generate` stopping at `<|action_end|>`, `<|im_end|>` or `</s>`,
and parses the text with its special tokens.

`OpenAIBackend` sends the conversation to `/v1/chat/completions` (e.g. `experiments.serve`): the plugin list
as `tools`, plugin calls as `tool_calls`, their results as `tool` messages; the server renders the same
InternLM2 prompt (`serving.openai_chat`) and parses the call. The OpenAI chat API has no interpreter turns,
so this backend serves plugins only; the server's raw `/v1/completions` keeps special strings as text and so
cannot carry InternLM2's chat format either.
"""

from __future__ import annotations

import json
from typing import Any, Optional, Sequence

from internlm2_jax.agent.protocol import parse_reply
from internlm2_jax.errors import ConfigValueError

Message = dict[str, Any]


class LocalBackend:
    """Greedy (or sampled) in-process generation with `internlm2_jax.generate.generate`."""

    def __init__(self, config: Any, params: Any, tokenizer: Any, *, max_new_tokens: int = 64,
                 temperature: float = 0.0, seed: int = 0):
        self.config, self.params, self.tokenizer = config, params, tokenizer
        self.max_new_tokens, self.temperature, self.seed = max_new_tokens, temperature, seed
        self.calls = 0
        action_end = tokenizer.special_ids.get("<|action_end|>")
        self.stop_ids = tuple(tokenizer.stop_ids) + ((action_end,) if action_end is not None else ())

    def prompts(self, conversations: Sequence[Sequence[Message]]) -> tuple[list[list[int]], int]:
        """Token ids of each conversation plus the generation prompt, and the new tokens that still fit the
        model's positions (at most `max_new_tokens`); a conversation that fills them is an error."""
        out = [self.tokenizer.encode_chat(c, add_generation_prompt=True) for c in conversations]
        longest, positions = max(map(len, out)), self.config.max_position_embeddings
        if longest >= positions:
            raise ConfigValueError(f"a conversation is {longest} tokens, and the model holds {positions}: "
                                   "lower --max-turns or --max-new-tokens")
        return out, min(self.max_new_tokens, positions - longest)

    def reply(self, conversations: Sequence[Sequence[Message]]) -> list[tuple[Message, Optional[str]]]:
        import jax

        from internlm2_jax.generate import generate

        tok = self.tokenizer
        rng = jax.random.fold_in(jax.random.key(self.seed), self.calls)
        self.calls += 1
        prompts, max_new = self.prompts(conversations)
        # Batches padded to a power of two (repeating the last prompt): the loop's shrinking batches then reuse
        # a few compiled programs instead of compiling one per size.
        prompts += [prompts[-1]] * ((1 << (len(prompts) - 1).bit_length()) - len(prompts))
        outs = generate(self.config, self.params, prompts, max_new_tokens=max_new,
                        temperature=self.temperature, stop_ids=self.stop_ids, rng=rng, pad_id=tok.pad_id,
                        vocab_limit=tok.vocab_size)
        return [parse_reply(tok.decode(ids)) for ids in outs[:len(conversations)]]


def to_openai(conversation: Sequence[Message]) -> tuple[list[dict[str, Any]], Optional[list[dict[str, Any]]]]:
    """`(messages, tools)` of a chat_format conversation for an OpenAI chat request (plugins only).

    Raises ValueError on interpreter turns, which the OpenAI chat API cannot carry.
    """
    messages: list[dict[str, Any]] = []
    tools = None
    last_id = None
    for n, m in enumerate(conversation):
        call = m.get("tool_call")
        if m.get("name") == "interpreter" or (call is not None and call.get("type") == "interpreter"):
            raise ValueError("the OpenAI chat API has no interpreter turns: run the interpreter with the "
                             "in-process backend (--hf)")
        if m["role"] == "system" and m.get("name") == "plugin":
            tools = [{"type": "function", "function": f} for f in json.loads(m["content"])]
        elif m["role"] == "environment":
            messages.append({"role": "tool", "tool_call_id": last_id, "content": m["content"]})
        elif call is not None:
            last_id = f"call_{n}"
            messages.append({"role": "assistant", "content": m.get("content") or None, "tool_calls": [
                {"id": last_id, "type": "function",
                 "function": {"name": call["name"], "arguments": json.dumps(call.get("parameters", {}),
                                                                            ensure_ascii=False)}}]})
        else:
            messages.append({"role": m["role"], "content": m.get("content") or ""})
    return messages, tools


class OpenAIBackend:
    """Chat completions from an OpenAI-compatible server (one request per conversation and turn)."""

    def __init__(self, base_url: str, *, model: Optional[str] = None, api_key: str = "none", max_tokens: int = 64,
                 temperature: float = 0.0, client: Any = None):
        import openai

        self.client = client or openai.OpenAI(base_url=base_url, api_key=api_key)
        self.model = model or self.client.models.list().data[0].id
        self.max_tokens, self.temperature = max_tokens, temperature

    def reply(self, conversations: Sequence[Sequence[Message]]) -> list[tuple[Message, Optional[str]]]:
        out = []
        for conversation in conversations:
            messages, tools = to_openai(conversation)
            extra = {"tools": tools} if tools else {}
            r = self.client.chat.completions.create(model=self.model, messages=messages, max_tokens=self.max_tokens,
                                                    temperature=self.temperature, **extra)
            msg = r.choices[0].message
            reply: Message = {"role": "assistant", "content": msg.content or ""}
            if msg.tool_calls:  # InternLM2 makes one call per turn: the first is run, as it would be in-process
                fn = msg.tool_calls[0].function
                try:
                    reply["tool_call"] = {"name": fn.name, "parameters": json.loads(fn.arguments or "{}")}
                except ValueError as e:
                    out.append((reply, f"could not read the call's arguments: {e}"))
                    continue
            out.append((reply, None))
        return out
