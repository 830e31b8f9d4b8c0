"""A scripted stand-in for the model in agent tests: replies are raw generated text, read by the agent's own
parser (`protocol.parse_reply`), exactly as `LocalBackend` reads a real model's decoded output."""

from typing import Callable, Sequence, Union

from internlm2_jax.agent.protocol import parse_reply

Reply = Union[str, Callable[[list], str]]


class ScriptedBackend:
    """Turn k of every conversation answers `script[k]` (a string, or a function of the conversation)."""

    def __init__(self, script: Sequence[Reply]):
        self.script = list(script)
        self.seen: list[list[dict]] = []  # the conversations as they were sent, turn by turn

    def reply(self, conversations):
        out = []
        for conv in conversations:
            self.seen.append([dict(m) for m in conv])
            turn = sum(m["role"] == "assistant" for m in conv)
            text = self.script[turn]
            out.append(parse_reply(text(conv) if callable(text) else text))
        return out
